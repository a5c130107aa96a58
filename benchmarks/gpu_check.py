"""The GPU acceptance run: numerics, host syncs and BERT-base speed on one NVIDIA GPU, results to strict JSON.

    biobert gpu-check --output gpu_check.json [--shards DIR] [--skip-benchmark] [--no-compile]

Checks (each records its numbers and passed: true/false; exit status 1 when any fails):
  optimizers        our multi-tensor LAMB/AdamW (every kernel present) vs the per-tensor reference LAMB (tested against
                    FusedLamb's kernel arithmetic) / torch AdamW, and vs DeepSpeed's FusedLamb/FusedAdam when their
                    op was built at install time (never JIT-compiled here; reported as unavailable otherwise)
  attention         flash varlen (bf16) vs transformers' BertForPreTraining (fp32): logits, loss, gradients; vs our
                    padded SDPA path in bf16; the dropout flash path: replay, unbiased mean, backward uses the
                    forward's mask (exact linearity in V, a central difference in Q)
  fp16_loss_scale   the trainer's fp16 plan through a real DeepSpeed engine: injected infs are skipped (weights and
                    LR untouched, skipped_steps counts them, scale halves after the hysteresis), others train
  host_syncs        the real trainer (tiny BERT, ZeRO-0 bf16 LAMB, accumulation 2) with steps >= 3 under
                    torch.cuda.set_sync_debug_mode: every synchronizing CUDA call inside a step is recorded with the
                    Python line that made it; passes at zero (also with model.compile unless --no-compile)
  train_benchmark   BERT-base seq 512 bf16, ZeRO-0 LAMB, micro-batch 24 x accumulation 8 (the recipe on one GPU):
                    ours, ours + model.compile, and transformers' BertForPreTraining under the same DeepSpeed config;
                    samples/s, TFLOPS, real-token MFU against the data-sheet peak, peak memory. Data: --shards, else
                    synthetic token ids with lengths drawn from the length distribution of real data_prep seq-512
                    shards (LENGTH_QUANTILES). Targets (MFU >= 50%, >= 2.5x HF) are reported beside it; the check
                    fails only on an error or a non-finite figure.
Without a CUDA device the CPU-capable checks (optimizers, fp16_loss_scale) run and the rest are marked skipped.
Non-finite numbers are written as the strings "nan"/"inf" (the file is strict JSON). Budget: ~4-6 minutes on an H100.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biobert.config import option, parse
from biobert.files import atomic_write

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks import gpu_numerics as gn  # noqa: E402

SKIP_MESSAGE = "no CUDA device: GPU checks skipped (benchmarks/gpu_check.py needs one NVIDIA GPU)"
# Sequence lengths of data_prep seq-512 shards (dynamic masking, MiniLM/BERT uncased vocab) of the MEDLINE sample
# corpus (../shared/data/corpus/pubmed/pubmed-sample-000{1..4}.xml.gz: 8,455 abstracts -> 16,718 sequences, fill
# 0.526): the 0, 2.5, 5, ..., 100th percentiles.
LENGTH_QUANTILES = [19, 60, 72, 82, 91, 101, 112, 123, 134, 145, 156, 167, 178, 189, 199, 210, 220, 229, 238, 248, 258,
                    269, 279, 289, 300, 311, 323, 335, 347, 360, 372, 386, 402, 419, 436, 454, 477, 505, 512, 512, 512]


def realistic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """n lengths drawn from LENGTH_QUANTILES (inverse CDF, linear between quantiles)."""
    u = np.random.default_rng(seed).random(n)
    return np.interp(u, np.linspace(0, 1, len(LENGTH_QUANTILES)), LENGTH_QUANTILES).round().astype(np.int64)


# ----------------------------------------------------------------------------------------------------- host syncs


@contextmanager
def record_syncs(found: list):
    """Sync debug mode "warn" for the block; every synchronizing CUDA call becomes a record (message, where)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            found.append(dict(message=str(w.message).splitlines()[0][:200], where=f"{w.filename}:{w.lineno}"))


def check_host_syncs(device, tmp: Path, compile_layers: bool, steps: int = 6) -> dict:
    from benchmarks.synthetic import write_synthetic_shards
    from pretraining import trainer
    from pretraining.config import load_config

    if device.type != "cuda":
        return dict(available=False, reason="CPU", passed=True)
    shards = tmp / "sync_shards"
    if not (shards / "manifest.json").is_file():
        write_synthetic_shards(shards, num_shards=2, samples_per_shard=64, seq_len=128, max_predictions=20,
                               vocab_size=1000, masking="dynamic")
    recipe = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "bert_base_seq512_lamb_bf16.json")
                        .read_text())
    recipe.update(train_batch_size=8, train_micro_batch_size_per_gpu=4)  # accumulation 2: the boundary is exercised
    run = dict(output_dir=str(tmp / f"sync_run_{int(compile_layers)}"), max_steps=steps, seed=1,
               model=dict(init=None, preset="tiny", tokenizer=str(shards), compile=compile_layers,
                          overrides=dict(attention_probs_dropout_prob=0.1)),
               data=dict(shard_dir=str(shards)), checkpoint=dict(every_steps=0, resume="never"),
               logging=dict(every_steps=3, progress_bar=False, tensorboard=False))
    cfg = load_config(run, recipe)
    found: list = []

    def guard(step):
        return record_syncs(found) if step >= 3 else _null()

    result = trainer.main(cfg, step_guard=guard)
    summary = result["summary"]
    guarded = steps - 2
    return dict(compiled=compile_layers, guarded_steps=guarded, syncs=len(found), syncs_per_step=len(found) / guarded,
                sites=found[:20], attention=summary["attention"], optimizer=summary["optimizer"],
                precision=summary["precision"], final_loss=summary.get("final_loss"),
                passed=not found and math.isfinite(summary.get("final_loss", float("nan"))))


@contextmanager
def _null():
    yield


# ------------------------------------------------------------------------------------------------------ benchmark


def check_train_benchmark(device, tmp: Path, shards: str | None, steps: int, warmup: int, micro: int, accum: int,
                          engines: list[str]) -> dict:
    from benchmarks import train_bench as tb
    from benchmarks.engine_bench import synthetic_shards

    if device.type != "cuda":
        return dict(available=False, reason="CPU", passed=True)
    data = shards
    if data is None:
        n = (steps + warmup) * micro * accum
        data = str(synthetic_shards(tmp / "bench_shards", 512, 30522, n, 0.25, seed=0, lengths=realistic_lengths(n)))
    rep = tb.main(tb.TrainBenchConfig(model="base", seq_len=512, micro_batch=micro, grad_accum=accum,
                                      precision="bf16", optimizer="lamb", zero_stage=0, steps=steps, warmup=warmup,
                                      shards=data, engines=engines))
    rep["data"] = (f"{shards} (given)" if shards else "synthetic ids, lengths drawn from real data_prep seq-512 "
                   "MEDLINE shards (LENGTH_QUANTILES)")
    figures = [v for r in rep["results"].values() for k, v in r.items() if isinstance(v, float)]
    rep["passed"] = bool(figures) and all(math.isfinite(v) for v in figures)
    return rep


def targets(results: dict) -> dict:
    bench = results.get("train_benchmark", {}).get("results", {})
    syncs = results.get("host_syncs", {})
    out = {}
    if bench:
        best = max((r for k, r in bench.items() if k.startswith("ours")), key=lambda r: r["samples_per_s"])
        hf = bench.get("hf_baseline")
        out["mfu_at_least_50pct"] = dict(value=best.get("mfu"), met=bool(best.get("mfu") and best["mfu"] >= 0.5))
        if hf:
            ratio = best["samples_per_s"] / hf["samples_per_s"]
            out["speedup_at_least_2_5x"] = dict(value=ratio, met=ratio >= 2.5)
    if "syncs" in syncs:
        out["zero_host_syncs_per_step"] = dict(value=syncs["syncs_per_step"], met=syncs["syncs"] == 0)
    return out


# -------------------------------------------------------------------------------------------------------------- main


def environment(device) -> dict:
    import deepspeed
    import transformers

    from pretraining import attention

    env = dict(torch=torch.__version__, cuda=torch.version.cuda, deepspeed=deepspeed.__version__,
               transformers=transformers.__version__, python=sys.version.split()[0],
               varlen_attn=attention.VARLEN_KERNEL is not None, device=str(device))
    try:
        from deepspeed.git_version_info import installed_ops

        env["deepspeed_prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    except ImportError:
        pass
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return env


def run_checks(device, a: GpuCheckConfig) -> dict:
    results: dict = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checks = [("optimizers", lambda: gn.check_optimizers(device)),
                  ("attention", lambda: gn.check_attention(device)),
                  ("fp16_loss_scale", lambda: gn.check_fp16_loss_scaling(device)),
                  ("host_syncs", lambda: check_host_syncs(device, tmp, compile_layers=False))]
        if not a.no_compile:
            checks.append(("host_syncs_compiled", lambda: check_host_syncs(device, tmp, compile_layers=True)))
        if not a.skip_benchmark:
            engines = ["ours", "hf_baseline"] + ([] if a.no_compile else ["ours_compiled"])
            checks.append(("train_benchmark", lambda: check_train_benchmark(
                device, tmp, a.shards, a.bench_steps, a.bench_warmup, a.bench_micro_batch, a.bench_grad_accum,
                engines)))
        for name, fn in checks:
            t = time.perf_counter()
            try:
                res = fn()
            except Exception as e:  # noqa: BLE001 - record and go on: one broken path must not hide the others
                res = dict(passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            res["seconds"] = time.perf_counter() - t
            results[name] = res
            state = "SKIP" if res.get("available") is False else "PASS" if res.get("passed") else "FAIL"
            print(f"{name}: {state} ({res['seconds']:.1f} s){'  ' + res['reason'] if 'reason' in res else ''}"
                  f"{'  ' + res['error'] if 'error' in res else ''}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return dict(checks=results, targets=targets(results), seconds=time.perf_counter() - t_start)


@dataclass(kw_only=True)
class GpuCheckConfig:
    """Numerics, host-sync and speed checks on one NVIDIA GPU."""

    output: str = option("gpu_check.json", "the report (strict JSON)")
    shards: str | None = option(None, "data_prep seq-512 shards for the benchmark (default: synthetic ids with the "
                                      "lengths of real MEDLINE shards)")
    skip_benchmark: bool = option(False, "numerics and sync checks only")
    no_compile: bool = option(False, "leave model.compile out of the sync check and the benchmark")
    bench_steps: int = option(10, "timed optimizer steps")
    bench_warmup: int = option(3, "untimed optimizer steps first")
    bench_micro_batch: int = option(24, "benchmark micro-batch (seq 512)")
    bench_grad_accum: int = option(8, "benchmark gradient accumulation (24 x 8 = the recipe's 192)")


def main(a: GpuCheckConfig) -> int:
    out = Path(a.output)
    cuda = torch.cuda.is_available()
    if not cuda:
        print(SKIP_MESSAGE, flush=True)
    from biobert import dist

    dist.init()
    device = dist.device() if cuda else torch.device("cpu")
    report = {"skipped": not cuda, **({"reason": SKIP_MESSAGE} if not cuda else {}), "environment": environment(device)}
    report.update(run_checks(device, a))
    report["passed"] = all(r.get("passed") for r in report["checks"].values())
    write_json(out, report)
    print(f"wrote {out}; all passed: {report['passed']}; targets: "
          + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'} ({v['value']})" for k, v in report["targets"].items()))
    return 0 if report["passed"] else 1


def strict(obj):
    """JSON-safe copy: non-finite floats become the strings "nan" / "inf" / "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None or isinstance(obj, float):
        return obj
    return str(obj)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(strict(obj), indent=2, allow_nan=False))


def cli(argv: list[str] | None = None) -> int:
    return main(parse(GpuCheckConfig, argv, prog="biobert gpu-check", description=__doc__))


if __name__ == "__main__":
    sys.exit(cli())
