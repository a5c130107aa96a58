"""Export: ZeRO-3 checkpoint (padded vocab) -> HF directory -> transformers loads it with the engine's logits; the
export's model card and provenance; DeepSpeed's own zero_to_fp32.py on our checkpoint directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pretraining import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, shared_data, minilm_dir):
    """Two steps of a tiny BERT under ZeRO-3 (one rank), vocab padded 30522 -> 30528; the live engine comes back."""
    from pretraining.trainer import main

    shards = ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)
    out = tmp_path_factory.mktemp("zero3")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = ef.tiny_run(out, shards, minilm_dir, max_steps=2,
                          model={"overrides": {"pad_vocab_multiple": 8, "hidden_dropout_prob": 0.0}})
        result = main(ef.load_tiny(run, ["ds.zero_optimization.stage=3", "ds.train_batch_size=2", "eval.enabled=false"]))
    finally:
        torch.set_num_threads(n)
    return out, result


def _inputs(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return ids, torch.zeros_like(ids), mask


def test_export_zero3_matches_engine_logits(zero3_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

    from pretraining.export import cli as export_cli

    out, result = zero3_run
    engine = result["engine"]
    assert engine.zero_optimization_stage() == 3
    hf_dir = tmp_path / "hf"
    assert export_cli([str(out / "checkpoints"), str(hf_dir)]) == 0
    hf, info = AutoModelForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert hf.config.vocab_size == 30522 and "pad_vocab_multiple" not in hf.config.to_dict()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("bert.embeddings.word_embeddings.weight")
    assert emb.shape[0] == 30522 and emb.dtype == torch.float32  # padding rows sliced off
    assert AutoTokenizer.from_pretrained(hf_dir).vocab_size == 30522
    assert AutoModel.from_pretrained(hf_dir).config.hidden_size == 64

    ids, types, mask = _inputs(30522)
    engine.eval()
    with torch.no_grad():
        mine = engine(input_ids=ids, token_type_ids=types, attention_mask=mask, return_logits=True)  # ZeRO-3 gathers
        theirs = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    engine.train()
    real = mask.bool()
    torch.testing.assert_close(theirs.prediction_logits[real], mine["prediction_logits"][real][:, :30522],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.seq_relationship_logits, mine["seq_relationship_logits"], atol=1e-4, rtol=1e-4)


def test_export_refuses_incomplete_checkpoint(zero3_run, tmp_path):
    import shutil

    from pretraining.export import export

    out, _ = zero3_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    folder = copy / "step_00000002"
    (folder / ckpt.MARKER).unlink()
    with pytest.raises(ValueError, match="incomplete checkpoint.*step_00000002.*no COMPLETE.json"):
        export(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    ckpt.mark_complete(folder, step=2, world_size=1, zero_stage=3)
    victim = next(folder.glob("*optim_states.pt"))
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated"):
        export(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def zero2_minilm_run(tmp_path_factory, shared_data, minilm_dir):
    """Two steps continuing the packaged MiniLM under ZeRO-2 (one rank) on real shards with a validation split."""
    from data_prep.run import PrepConfig
    from data_prep.run import main as prep
    from pretraining.trainer import main

    base = tmp_path_factory.mktemp("zero2")
    shards = base / "shards"
    prep(PrepConfig(inputs=[str(shared_data / "corpus" / "pmc_oa")], output_dir=str(shards), vocab=str(minilm_dir),
                    seq_len=64, num_shards=1, workers=1, progress=False, validation_fraction=0.05))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = ef.tiny_run(base / "run", shards, None, max_steps=2, model={"init": "minilm"},
                          checkpoint={"every_steps": 1, "keep_last": 2})
        main(ef.load_tiny(run, ["ds.train_batch_size=4"]))
    finally:
        torch.set_num_threads(n)
    return base / "run"


def test_deepspeed_zero_to_fp32_works_unchanged_on_our_checkpoints(zero2_minilm_run, tmp_path):
    """DeepSpeed's own script, as a user runs it (the copy DeepSpeed puts beside the checkpoints, no -t): it finds the
    newest checkpoint through `latest`."""
    import subprocess

    import deepspeed.utils

    from pretraining.export import fp32_state_dict

    root = zero2_minilm_run / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"  # written after the marker of the newest save
    assert ckpt.check_complete(root / (root / "latest").read_text()) == (True, "")
    script = root / "zero_to_fp32.py"
    assert script.read_bytes() == (Path(deepspeed.utils.__file__).parent / "zero_to_fp32.py").read_bytes()
    r = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "fp32")], env=ef.clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "fp32" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ours = fp32_state_dict(root / "step_00000002")
    assert set(theirs) == set(ours) and len(ours) > 50
    for k in ours:
        torch.testing.assert_close(theirs[k].float(), ours[k], rtol=0, atol=0)


def test_export_says_where_it_came_from(zero2_minilm_run, tmp_path):
    import json
    import math
    import stat

    from huggingface_hub import ModelCard
    from transformers import AutoModelForPreTraining

    from pretraining.export import cli as export_cli

    run = tmp_path / "run"
    import shutil

    shutil.copytree(zero2_minilm_run, run)
    # a validation record as the trainer's evaluation writes it (step 1 and 2; the export's step is 2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "val_mlm_loss": 3.5, "val_mlm_acc": 0.4, "val_nsp_acc": 0.6}) + "\n")
        f.write(json.dumps({"step": 2, "val_loss": 3.3, "val_mlm_loss": 3.0, "val_mlm_acc": 0.45,
                            "val_nsp_acc": 0.7}) + "\n")
    out = tmp_path / "hf"
    assert export_cli([str(run / "checkpoints"), str(out)]) == 0
    assert AutoModelForPreTraining.from_pretrained(out) is not None
    for f in out.iterdir():  # readable by the next person on a shared cluster
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f
    config = json.loads((out / "config.json").read_text())
    assert config["_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    prov = json.loads((out / "provenance.json").read_text())
    manifest = zero2_minilm_run.parent / "shards" / "manifest.json"
    import hashlib

    assert prov["corpus"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    m = json.loads(manifest.read_text())
    assert prov["corpus"]["documents"] == m["settings"]["summary"]["docs"] == 6
    assert prov["corpus"]["validation_documents"] == m["validation"]["documents"] == 2
    tokens = int(sum(json.loads(line)["tokens"] for line in (run / "metrics.jsonl").read_text().splitlines()
                     if "\"tokens\"" in line))
    assert prov["training"]["steps"] == 2 and prov["training"]["samples"] == 8 and prov["training"]["tokens_seen"] == tokens
    assert prov["validation"] == {"step": 2, "loss": 3.3, "mlm_loss": 3.0, "perplexity": math.exp(3.0),
                                  "mlm_acc": 0.45, "nsp_acc": 0.7}
    assert prov["base_model"]["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert prov["export_command"] == ["biobert", "export", str(run / "checkpoints"), str(out)]
    assert json.loads((out / "training_config.json").read_text())["max_steps"] == 2

    card = ModelCard.load(out / "README.md")  # the hub's own parser reads the front matter
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.license == "apache-2.0"
    assert card.data.language == ["en"] and "biomedical" in card.data.tags
    text = card.text
    assert "perplexity 20.09" in text and "8 samples" in text and f"{tokens:,} tokens seen" in text
    assert prov["corpus"]["manifest_sha256"][:16] in text and "biobert pretrain --config training_config.json" in text


def test_export_without_records_says_so(zero3_run, tmp_path):
    import json

    from pretraining.export import export

    out, _ = zero3_run
    hf = export(out / "checkpoints", tmp_path / "hf", license="cc-by-4.0")
    prov = json.loads((hf / "provenance.json").read_text())
    assert prov["base_model"]["spec"] is None and prov["base_model"]["from_scratch"] == "tiny"
    assert prov["validation"] is None and prov["license"] == "cc-by-4.0"
    text = (hf / "README.md").read_text()
    assert "license: cc-by-4.0" in text and "base_model" not in text.split("---")[1]
    assert "freshly initialised BERT (`tiny` preset)" in text and "final validation | not measured" in text
    assert json.loads((hf / "config.json").read_text())["_name_or_path"] == "from scratch (tiny)"


def test_card_says_what_is_missing_instead_of_failing(tmp_path):
    """Shards without a data_prep summary (synthetic, NVIDIA-made), no metrics, no run config: still a card."""
    import json

    from pretraining import model_card

    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 32, "settings": {}}))
    prov = model_card.provenance(tmp_path / "run" / "checkpoints" / "step_00000001", {"step": 1}, {}, license=None,
                                 export_command=["biobert", "export", "x", "y"])
    prov["corpus"] = model_card.describe_corpus(str(tmp_path))
    text = model_card.model_card(prov, "m")
    assert "documents and tokens not recorded in the manifest" in text and "license: other" in text
    assert "License: not determined" in text and "tokens seen" in text and "not recorded" in text
    assert model_card.describe_corpus(str(tmp_path / "gone"))["available"] is False
