"""One command for the whole benchmark suite; every figure is measured beside its baseline in the same run.

    biobert bench [--quick] [--suite prep loader train finetune] --output-dir OUT
    biobert bench engine|train|loader|prep|profile|finetune --help      # one benchmark on its own

Writes OUT/results.json, OUT/results.md (markdown tables: ours | baseline | ratio) and PNG plots (training throughput
vs micro-batch and vs world size, loader throughput). Real data (the shared MEDLINE sample and NCBI-disease, found via
$BIOBERT_DATA or ../shared/data) is used where present, synthetic data otherwise; results say which. See
docs/benchmarks.md for the FLOPs accounting and how MFU is computed.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks import report, suites  # noqa: E402
from benchmarks.grid import SUITES, SuiteConfig  # noqa: E402
from biobert.config import option, parse  # noqa: E402


@dataclass(kw_only=True)
class BenchArgs:
    """The benchmark suite; every figure beside its same-run baseline."""

    output_dir: str = option(help="results.json, results.md and the PNG plots go here")
    quick: bool = option(False, "the short preset: a few minutes on a 2-core CPU")
    suite: list[str] = option(factory=lambda: list(SUITES), help="suites to run", choices=SUITES)
    synthetic: bool = option(False, "ignore the shared data; synthetic inputs everywhere")
    seq_lens: list[int] | None = option(None, "loader and train: sequence lengths (default 128 512)")
    models: list[str] | None = option(None, "train: tiny | base | large | minilm | an HF directory")
    micro_batches: list[int] | None = option(None, "train: micro-batch sizes")
    zero_stages: list[int] | None = option(None, "train: ZeRO stages (0..3)")
    precisions: list[str] | None = option(None, "train: precisions", choices=("fp32", "bf16", "fp16"))
    world_sizes: list[int] | None = option(None, "train scaling: world sizes (default 1 2; 1 alone skips scaling)")
    steps: int | None = option(None, "train: timed steps per case")
    threads: int | None = option(None, "train grid: torch threads (default: all cores)")
    finetune_tasks: list[str] | None = option(None, "fine-tuning tasks (names of `biobert bench finetune`)")
    finetune_examples: int | None = option(None, "fine-tuning: training examples per task")


def parse_args(argv=None) -> SuiteConfig:
    a = parse(BenchArgs, argv, prog="biobert bench", description=__doc__)
    return SuiteConfig.preset(
        a.output_dir, a.quick, suites=a.suite, use_real_data=not a.synthetic, seq_lens=a.seq_lens, models=a.models,
        micro_batches=a.micro_batches, zero_stages=a.zero_stages, precisions=a.precisions, world_sizes=a.world_sizes,
        train_steps=a.steps, threads=a.threads, finetune_tasks=a.finetune_tasks, finetune_examples=a.finetune_examples)


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
