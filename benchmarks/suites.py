"""The four suites. Each returns rows: one measured figure beside its same-run baseline.

Row schema (results.json / results.md): suite, case (what was measured, in words), metric, unit, ours, baseline,
baseline_name, ratio (= ours / baseline; higher is better for every metric here), plus `params` (the knobs that
varied: seq_len, micro_batch, world_size, ...) for the plots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.grid import SuiteConfig

REPO = Path(__file__).resolve().parents[1]


def row(suite: str, case: str, metric: str, unit: str, ours: float, baseline: float, baseline_name: str,
        **params) -> dict:
    return dict(suite=suite, case=case, metric=metric, unit=unit, ours=float(ours), baseline=float(baseline),
                baseline_name=baseline_name, ratio=float(ours) / float(baseline) if baseline else None, params=params)


# ---------------------------------------------------------------------------------------------------------------- prep

def prep_inputs(cfg: SuiteConfig) -> tuple[list[str], str]:
    """(input paths, description): the shared MEDLINE sample when present, else the embedded demo corpus."""
    pubmed = cfg.data_root / "corpus" / "pubmed"
    if cfg.real:
        files = sorted(str(p) for p in pubmed.iterdir() if p.name.endswith((".xml", ".xml.gz")))
        files = files[: cfg.prep_files] if cfg.prep_files else files
        return files, f"real: {len(files)} MEDLINE files from {pubmed}"
    demo = REPO / "data_prep" / "samples" / "demo_corpus.txt"
    return [str(demo)], f"embedded demo corpus {demo.name} (no shared data at {cfg.data_root})"


def run_prep(cfg: SuiteConfig) -> tuple[list[dict], dict]:
    from benchmarks import prep_bench
    from data_prep.demo import default_vocab

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    inputs, source = prep_inputs(cfg)
    vocab = str(default_vocab())
    ceiling, _, ceiling_tokens = prep_bench.ceiling(inputs, vocab, repeats=cfg.prep_repeats)
    rows = []
    for w in cfg.prep_workers:
        s = prep_bench.end_to_end(inputs, vocab, w, seq_len=128)
        sec = s["seconds"]
        case = f"data_prep end-to-end, {w} worker(s), seq 128, static masking"
        rows.append(row("prep", case, "tokens/s per worker", "tokens/s", s["tokens"] / sec / w, ceiling,
                        "raw tokenizers encode_batch, 1 thread", workers=w))
        rows[-1].update(docs_per_s=s["docs"] / sec, tokens_per_s=s["tokens"] / sec,
                        shard_mb_per_s=s["shard_bytes"] / 2**20 / sec, docs=s["docs"], tokens=s["tokens"])
    return rows, {"prep_data": source, "prep_ceiling_tokens": ceiling_tokens}


def make_real_shards(cfg: SuiteConfig, out_dir: Path, seq_len: int, dynamic: bool) -> Path | None:
    """data_prep shards of the shared corpus (MiniLM vocab), for the loader and train suites; None without the data."""
    from data_prep import run as prep_run
    from data_prep.demo import default_vocab

    inputs, source = prep_inputs(cfg)
    if not source.startswith("real"):
        return None
    d = out_dir / f"real-{'dynamic' if dynamic else 'static'}-{seq_len}"
    prep_run.main(prep_run.PrepConfig(inputs=inputs, output_dir=str(d), vocab=str(default_vocab()), seq_len=seq_len,
                                      dynamic_masking=dynamic, workers=1, progress=False))
    return d


# -------------------------------------------------------------------------------------------------------------- loader

def run_loader(cfg: SuiteConfig, real_shards: dict) -> tuple[list[dict], dict]:
    import torch

    from benchmarks import loader_bench as lb
    from data_prep.demo import default_vocab

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one trainer process's loader: do not spread over the cores
    try:
        res = lb.main(lb.LoaderBenchConfig(seq_lens=cfg.seq_lens, micro_batch=cfg.loader_micro_batch,
                                           seconds=cfg.loader_seconds, num_shards=2,
                                           samples_per_shard=cfg.loader_samples_per_shard))
        for r in res:
            r["data"] = "synthetic"
        for _, d in sorted(real_shards.items()):
            for r in lb.main(lb.LoaderBenchConfig(shard_dir=str(d), micro_batch=cfg.loader_micro_batch,
                                                  seconds=cfg.loader_seconds, vocab=str(default_vocab()))):
                res.append({**r, "data": "real"})
    finally:
        torch.set_num_threads(threads)
    rows = [row("loader", f"shard loader, {r['data']} {r['masking']} shards, seq {r['seq_len']}, micro-batch "
                f"{r['micro_batch']}, 1 process", "samples/s per process", "samples/s", r["loader_samples_per_s"],
                r["baseline_samples_per_s"], "plain h5py+numpy reader (HF-style masking for dynamic)",
                seq_len=r["seq_len"], masking=r["masking"], data=r["data"]) for r in res]
    return rows, {}


# --------------------------------------------------------------------------------------------------------------- train

def _train_rows(rep: dict, case_extra: str = "") -> list[dict]:
    ours, hf = rep["results"]["ours"], rep["results"]["hf_baseline"]
    c = rep["config"]
    params = dict(model=c["model"], seq_len=rep["seq_len"], micro_batch=rep["micro_batch"],
                  zero_stage=rep["zero_stage"], precision=rep["precision"], world_size=rep["world_size"],
                  threads=rep["torch_threads"], data="synthetic" if c["shards"] is None else "real")
    case = (f"{c['model']} seq {rep['seq_len']} micro-batch {rep['micro_batch']} ZeRO-{rep['zero_stage']} "
            f"{rep['precision']} world {rep['world_size']} ({params['data']} data, fill {rep['fill']:.2f}){case_extra}")
    base = "HF BertForPreTraining, same DeepSpeed config"
    rows = [row("train", case, m, u, ours[k], hf[k], base, **params) for m, u, k in (
        ("samples/s", "samples/s", "samples_per_s"), ("tokens/s", "tokens/s", "tokens_per_s"),
        ("TFLOPS (useful)", "TFLOPS", "tflops"))]
    if ours["mfu"] is not None:
        rows.append(row("train", case, "MFU", "fraction", ours["mfu"], hf["mfu"], base, **params))
    # Lower is better for these two, so the ratio is baseline / ours to keep ">1 = we win".
    for m, u, k in (("peak memory", "MB", "peak_memory_mb"), ("data-wait fraction", "fraction", "data_wait_fraction")):
        r = row("train", case, m, u, ours[k], hf[k], base, **params)
        r["ratio"] = hf[k] / ours[k] if ours[k] else None
        r["lower_is_better"] = True
        rows.append(r)
    if "ours_compiled" in rep["results"]:  # model.compile: true, same batches
        comp = rep["results"]["ours_compiled"]
        rows.append(row("train", case + " [model.compile]", "samples/s", "samples/s", comp["samples_per_s"],
                        hf["samples_per_s"], base, compiled=True, **params))
        rows.append(row("train", case + " [model.compile vs eager]", "samples/s", "samples/s", comp["samples_per_s"],
                        ours["samples_per_s"], "ours, eager", compiled=True, **params))
    for r in rows:
        r.update(peak_tflops_per_device=rep["peak_tflops_per_device"], peak_source=rep["peak_source"])
    return rows


def train_subprocess(tb_cfg, world_size: int, out_json: Path, timeout: float = 1800) -> dict:
    """The train benchmark under the deepspeed launcher (world_size ranks: CPU processes here, GPUs on a node)."""
    import socket

    with socket.socket() as s:  # a free port: other jobs on this machine may hold DeepSpeed's default 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", tb_cfg.model, "--seq-len", str(tb_cfg.seq_len), "--micro-batch", str(tb_cfg.micro_batch),
            "--zero-stage", str(tb_cfg.zero_stage), "--precision", tb_cfg.precision, "--optimizer", tb_cfg.optimizer,
            "--steps", str(tb_cfg.steps), "--warmup", str(tb_cfg.warmup), "--min-fill", str(tb_cfg.min_fill),
            "--seed", str(tb_cfg.seed), "--json", str(out_json)]
    for flag, v in (("--shards", tb_cfg.shards), ("--threads", tb_cfg.threads), ("--peak-tflops", tb_cfg.peak_tflops)):
        if v is not None:
            args += [flag, str(v)]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size),
                "--master_port", str(port)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if tb_cfg.threads:
        env["OMP_NUM_THREADS"] = str(tb_cfg.threads)
    cmd = launcher + [str(REPO / "benchmarks" / "train_bench.py")] + args
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"train benchmark at world size {world_size} failed (exit {proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def run_train(cfg: SuiteConfig, real_shards: dict) -> tuple[list[dict], dict]:
    from benchmarks import train_bench as tb

    rows, reports = [], []
    for c in cfg.train_cases(real_shards):
        rep = tb.main(c)
        reports.append(rep)
        rows += _train_rows(rep)
        print(f"  train {rows[-1]['case']}: ours {rep['results']['ours']['samples_per_s']:.2f} samples/s, "
              f"HF {rep['results']['hf_baseline']['samples_per_s']:.2f} (x{rep['speedup']:.2f})", flush=True)
    scaling = []
    if cfg.world_sizes and max(cfg.world_sizes) > 1:
        c = cfg.scaling_case(real_shards)
        by_ws = {}
        with tempfile.TemporaryDirectory() as tmp:
            for ws in cfg.world_sizes:
                rep = tb.main(c) if ws == 1 and not cfg.scaling_subprocess else train_subprocess(
                    c, ws, Path(tmp) / f"ws{ws}.json")
                by_ws[ws] = rep
                rows += _train_rows(rep, " [scaling]")
        base = by_ws[min(by_ws)]
        for ws, rep in sorted(by_ws.items()):
            for eng in ("ours", "hf_baseline"):
                one = base["results"][eng]["samples_per_s"] * ws / min(by_ws)
                scaling.append(dict(engine=eng, world_size=ws, samples_per_s=rep["results"][eng]["samples_per_s"],
                                    efficiency=rep["results"][eng]["samples_per_s"] / one))
        for ws in sorted(by_ws)[1:]:
            eff = {s["engine"]: s["efficiency"] for s in scaling if s["world_size"] == ws}
            r = row("train", f"scaling efficiency world {min(by_ws)} -> {ws} ({c.model} seq {c.seq_len} micro-batch "
                    f"{c.micro_batch} per rank, {c.threads or 'default'} thread(s) per rank)", "scaling efficiency",
                    "fraction", eff["ours"], eff["hf_baseline"], "HF BertForPreTraining, same DeepSpeed config",
                    world_size=ws)
            rows.append(r)
    return rows, {"train_reports": reports, "scaling": scaling}


# ------------------------------------------------------------------------------------------------------------ finetune

def _synthetic_ner(root: Path, n: int) -> Path:
    """A token-per-line NER set in the NCBI-disease layout (used only where the shared data is absent)."""
    import random

    d = root / "ner" / "NCBI-disease-IOB"
    d.mkdir(parents=True, exist_ok=True)
    words = "the patient had a history of breast cancer and type 2 diabetes with renal failure".split()
    rng = random.Random(0)
    for split in ("train", "devel", "test"):
        lines = []
        for _ in range(n):
            sent = rng.sample(words, 10)
            lines += [f"{w}\t{'B-Disease' if w in ('cancer', 'diabetes') else 'O'}" for w in sent]
            lines.append("")
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run_finetune(cfg: SuiteConfig) -> tuple[list[dict], dict]:
    from finetuning import benchmark as fb

    with tempfile.TemporaryDirectory() as tmp:
        root = cfg.data_root
        if cfg.use_real_data and (root / "ner" / "NCBI-disease-IOB").is_dir():
            source = f"real: NCBI-disease from {root}"
        else:
            root = _synthetic_ner(Path(tmp) / "data", cfg.finetune_examples)
            source = "synthetic NER sentences (no shared data)"
        argv = ["--model", cfg.finetune_model, "--data-root", str(root), "--output-dir", str(Path(tmp) / "out"),
                "--tasks", *cfg.finetune_tasks, "--max-train-examples", str(cfg.finetune_examples),
                "--max-eval-examples", str(cfg.finetune_examples), "--epochs", str(cfg.finetune_epochs),
                "--max-seq-len", str(cfg.finetune_seq_len), "--batch-size", str(cfg.finetune_batch),
                "--gad-folds", "2"]
        cfg_fb, given = fb.parse_suite(fb.FinetuneBenchConfig, fb.TASK_CONFIGS.values(), argv, prog="bench")
        res = fb.main(cfg_fb, given)
    rows = []
    for task in dict.fromkeys(r["task"] for r in res):
        ours = next(r for r in res if r["task"] == task and r["system"] == "ours")
        hf = next(r for r in res if r["task"] == task and r["system"] == "hf_trainer")
        rows.append(row("finetune", f"{task} fine-tuning, {cfg.finetune_model}, {cfg.finetune_examples} training "
                        f"examples, seq {cfg.finetune_seq_len}, batch {cfg.finetune_batch}", "train examples/s",
                        "examples/s", ours["train_examples_per_s"], hf["train_examples_per_s"],
                        "HF Trainer (same model, data, hyperparameters)", task=task))
        rows[-1]["scores"] = {"ours": {k: v for k, v in ours.items() if k not in ("task", "system")},
                              "hf_trainer": {k: v for k, v in hf.items() if k not in ("task", "system")}}
    return rows, {"finetune_data": source}
