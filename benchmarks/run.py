"""One command for the whole benchmark suite; every figure is measured beside its baseline in the same run.

    biobert bench [--quick] [--suite prep,loader,train,finetune] --output-dir OUT
    biobert bench engine|train|loader|prep|profile|finetune --help      # one benchmark on its own

Writes OUT/results.json, OUT/results.md (markdown tables: ours | baseline | ratio) and PNG plots (training throughput
vs micro-batch and vs world size, loader throughput). Real data (the shared MEDLINE sample and NCBI-disease, found via
$BIOBERT_DATA or ../shared/data) is used where present, synthetic data otherwise; results say which. See
docs/benchmarks.md for the FLOPs accounting and how MFU is computed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks import report, suites  # noqa: E402
from benchmarks.grid import SUITES, SuiteConfig  # noqa: E402


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",")] if text else None


def _strs(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def parse_args(argv=None) -> SuiteConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    p.add_argument("--suite", default=",".join(SUITES), help="comma list of " + ",".join(SUITES))
    p.add_argument("--synthetic", action="store_true", help="ignore the shared data; synthetic inputs everywhere")
    p.add_argument("--seq-lens", help="comma list (loader and train), default 128,512")
    p.add_argument("--models", help="train: comma list of tiny|base|large|minilm|HF dir")
    p.add_argument("--micro-batches", help="train: comma list")
    p.add_argument("--zero-stages", help="train: comma list of 0..3")
    p.add_argument("--precisions", help="train: comma list of fp32,bf16,fp16")
    p.add_argument("--world-sizes", help="train scaling: comma list (default 1,2; '1' skips scaling)")
    p.add_argument("--steps", type=int, help="train: timed steps per case")
    p.add_argument("--threads", type=int, help="train grid: torch threads (default: all cores)")
    p.add_argument("--finetune-tasks", help="comma list (finetuning/benchmark.py task names)")
    p.add_argument("--finetune-examples", type=int)
    a = p.parse_args(argv)
    return SuiteConfig.preset(
        a.output_dir, a.quick, suites=_strs(a.suite), use_real_data=not a.synthetic, seq_lens=_ints(a.seq_lens),
        models=_strs(a.models), micro_batches=_ints(a.micro_batches), zero_stages=_ints(a.zero_stages),
        precisions=_strs(a.precisions), world_sizes=_ints(a.world_sizes), train_steps=a.steps, threads=a.threads,
        finetune_tasks=_strs(a.finetune_tasks), finetune_examples=a.finetune_examples)


def main(cfg: SuiteConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   quick=cfg.quick, suites=cfg.suites, hardware=report.hardware(), data={}, rows=[], extra={},
                   errors=[], config={k: str(v) for k, v in vars(cfg).items()})
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        real_shards = {}
        if cfg.real and {"loader", "train"} & set(cfg.suites):
            for seq in cfg.seq_lens:
                maskings = {"static"} | (set(cfg.real_loader_maskings) if "loader" in cfg.suites else set())
                for masking in sorted(maskings):
                    real_shards[(seq, masking)] = suites.make_real_shards(cfg, Path(tmp), seq, masking == "dynamic")
            results["data"]["shards"] = (f"real: data_prep shards of {cfg.data_root / 'corpus' / 'pubmed'} "
                                         f"(MiniLM vocab), seq {cfg.seq_lens}")
        else:
            results["data"]["shards"] = "synthetic variable-length shards (benchmarks.synthetic)"
        for suite in cfg.suites:
            print(f"== {suite}", flush=True)
            t = time.perf_counter()
            try:
                if suite == "prep":
                    rows, extra = suites.run_prep(cfg)
                elif suite == "finetune":
                    rows, extra = suites.run_finetune(cfg)
                else:
                    rows, extra = getattr(suites, f"run_{suite}")(cfg, real_shards)
            except Exception as e:  # one broken suite must not hide the others' figures; it is reported instead
                traceback.print_exc()
                results["errors"].append(f"{suite}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            results["rows"] += rows
            for k, v in extra.items():
                (results["data"] if k.endswith(("_data", "data")) else results["extra"])[k] = v
            results["extra"][f"{suite}_seconds"] = time.perf_counter() - t
    results["wall_s"] = time.perf_counter() - t0
    report.write(results, out)
    print(report.markdown(results))
    return results


# `biobert bench TOOL ...`: the single benchmarks, each with its own flags
TOOLS = {"engine": "benchmarks.engine_bench", "train": "benchmarks.train_bench", "loader": "benchmarks.loader_bench",
         "prep": "benchmarks.prep_bench", "profile": "benchmarks.profile_step", "finetune": "finetuning.benchmark"}


def cli(argv: list[str] | None = None) -> int:
    """`biobert bench [--quick] --output-dir OUT` runs the suite; `biobert bench TOOL --help` one benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).cli(argv[1:])
    res = main(parse_args(argv))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(cli())
