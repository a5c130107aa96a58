"""Per-step metrics to the console (tqdm), TensorBoard and ``metrics.jsonl``; throughput, TFLOPS and MFU.

MFU = achieved model FLOPs / device peak. Model FLOPs come from ``model.training_flops_per_sequence`` evaluated at each
sequence's real (non-padding) length and real number of masked positions, i.e. useful work only: an engine that
computes on padding gets no credit for it. Peak per device (dense tensor-core TFLOPS, from the vendors' data sheets):
the table below, matched on the accelerator's name, for the run's precision. On CPU there is no data sheet to match,
so the peak is ``logging.peak_tflops`` when set, else a quick probe: the best of a few 1024x1024 fp32 matmuls on this
process's threads (so CPU MFU reads "fraction of what a plain matmul achieves here", not of a marketing figure).
Only rank 0 writes anything; besides metrics.jsonl it reports to the ``logging.report_to`` backends
(biobert.tracking: TensorBoard, MLflow, W&B). Validation figures (pretraining.evaluation) ride on their step's record as
``"validation": {...}`` (one line per step in metrics.jsonl), go to the backends as ``val/*`` and close the summary
as ``val_*``. The trainer reads the device once per logging interval, so a step's ``step_time`` is its
interval's wall time split evenly (the GPU runs ahead of the host in between); the first step is an interval of its
own (it pays for warm-up and compilation, and the summary leaves it out). The summary record also names what ran:
``attention`` (flash_varlen | flash_varlen_dropout | sdpa_padded), ``optimizer`` (class[kernel]), ``precision``.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import torch

from biobert.files import atomic_write

# name substring -> {precision: dense TFLOPS}; fp32 on Ampere+ counts TF32 tensor cores (torch's default for matmul
# is IEEE fp32 unless allow_tf32 is set; we report against TF32 because that is what a tuned run uses).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM / HBM3
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "V100": {"bf16": 125.0, "fp16": 125.0, "fp32": 15.7},  # no bf16 tensor cores: bf16 would be emulated
}


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOPS, where the number came from)."""
    if override:
        return float(override), "config logging.peak_tflops"
    for key, table in PEAK_TFLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return table[precision], f"table {key} {precision}"
    if "cpu" in device_name.lower():
        return cpu_matmul_tflops(precision), f"cpu {precision} matmul probe"
    return float("nan"), f"unknown device {device_name!r}: set logging.peak_tflops"


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_matmul_tflops(precision: str = "fp32") -> float:
    """Best of a few 1024 x 1024 matmuls in the run's precision on this process's threads: the CPU's practical peak
    (AVX-512 bf16 runs bf16 matmuls faster than fp32 ones, so an fp32 probe would put a bf16 run's MFU above 100%)."""
    return _matmul_probe(precision, torch.get_num_threads())


@lru_cache(maxsize=8)
def _matmul_probe(precision: str, threads: int, n: int = 1024, repeats: int = 5) -> float:  # threads: cache key
    g = torch.Generator().manual_seed(0)  # never touch the global RNG: a probe must not change a run's dropout
    a, b = (torch.randn(n, n, generator=g).to(PRECISION_DTYPES[precision]) for _ in range(2))
    a @ b  # warm-up: thread pool, caches
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def batch_flops(config, attention_mask: torch.Tensor, masked_lm_positions: torch.Tensor | None) -> float:
    """Useful training FLOPs of one micro-batch: each sequence at its real length and real masked count."""
    from pretraining.model import training_flops_per_sequence

    lengths = attention_mask.sum(1).tolist()
    masked = (masked_lm_positions != 0).sum(1).tolist() if masked_lm_positions is not None else [None] * len(lengths)
    return sum(training_flops_per_sequence(config, int(t), None if m is None else int(m))
               for t, m in zip(lengths, masked))


def truncate_metrics(path: Path, start_step: int) -> int:
    """Keep only what happened up to ``start_step`` (the step a run resumes from): step records with step <= it and
    summaries of runs that ended there. Temp + rename, so a kill meanwhile leaves the old file. Returns lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a hard kill
            dropped += 1
            continue
        step = rec["step"] if "step" in rec else rec.get("summary", {}).get("final_step", 0)
        if step <= start_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLogger:
    """``log(step, record)`` once per optimizer step; ``summary()`` at the end. Inactive (no I/O) off rank 0.

    ``report_to``: biobert.tracking backends (default: TensorBoard when ``tensorboard``), ``tracking``: their
    settings (config, project, run_name, tracking_uri). They get ``train/*`` every ``every_steps`` and ``val/*``
    whenever a record carries ``validation`` (pretraining.evaluation), which also prints one line."""

    def __init__(self, out_dir: str | Path, *, active: bool, start_step: int, max_steps: int, peak: float,
                 peak_source: str, every_steps: int = 1, progress_bar: bool = True, tensorboard: bool = True,
                 report_to: list[str] | None = None, tracking: dict | None = None):
        self.active, self.every = active, every_steps
        self.peak, self.peak_source = peak, peak_source
        self.start_step, self.max_steps = start_step, max_steps
        self.records: list[dict] = []
        self.jsonl = self.tracker = self.bar = None
        self.t_start = time.perf_counter()
        if not active:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        backends = report_to if report_to is not None else ["tensorboard"] if tensorboard else []
        if backends:  # first: a backend that cannot start stops the run before metrics.jsonl is touched
            from biobert.tracking import Tracker

            # a resumed run continues its MLflow/W&B run; TensorBoard purges the steps after start_step
            self.tracker = Tracker(backends, out, start_step=start_step, resume=start_step > 0, **(tracking or {}))
        truncate_metrics(path, start_step)  # steps redone after a hard kill are logged once, not twice
        self.jsonl = open(path, "a", buffering=1, encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict) -> dict:
        """Adds throughput figures to ``record`` (which has samples, tokens, flops, step_time, data_wait)."""
        t = record["step_time"]
        record["samples_per_s"] = record["samples"] / t
        record["tokens_per_s"] = record["tokens"] / t
        record["tflops"] = record["flops"] / t / 1e12
        record["mfu"] = record["tflops"] / self.peak if self.peak and math.isfinite(self.peak) else None
        record = {"step": step, **record}
        self.records.append(record)
        if not self.active:
            return record
        self.jsonl.write(json.dumps(record) + "\n")
        val = record.get("validation")
        if val is not None:
            if self.tracker is not None:
                self.tracker.log({f"val/{k}": v for k, v in val.items()}, step)
            from tqdm import tqdm

            tqdm.write(f"validation | step {step} | " + " | ".join(
                f"{k} {val[k]:.4g}" for k in ("mlm_loss", "perplexity", "mlm_acc", "nsp_loss", "nsp_acc")) +
                f" | {val['samples']} samples, {val['seconds']:.1f} s")
        if step % self.every == 0 or step == self.max_steps:
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "validation")},
                                 step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['mlm_acc']:.3f}",
                                     lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}", refresh=False)
        if self.bar is not None:
            self.bar.update(1)
        return record

    def summary(self, **extra) -> dict:
        recs = self.records[1:] or self.records  # the first step pays for warm-up/compilation
        out: dict = {"steps": len(self.records), "wall_s": time.perf_counter() - self.t_start, **extra}
        if recs:
            total_t = sum(r["step_time"] for r in recs)
            out.update(
                first_loss=self.records[0]["loss"], final_loss=self.records[-1]["loss"],
                final_mlm_acc=self.records[-1]["mlm_acc"],
                samples_per_s=sum(r["samples"] for r in recs) / total_t,
                tokens_per_s=sum(r["tokens"] for r in recs) / total_t,
                tflops=sum(r["flops"] for r in recs) / total_t / 1e12,
                data_wait_fraction=sum(r["data_wait"] for r in recs) / total_t,
                skipped_steps=self.records[-1].get("skipped_steps", 0),
                peak_tflops=self.peak, peak_source=self.peak_source,
            )
            out["mfu"] = out["tflops"] / self.peak if self.peak and math.isfinite(self.peak) else None
        val = next((r for r in reversed(self.records) if r.get("validation")), None)
        if val is not None:  # the last evaluation of this run (its step: val_step)
            out.update(val_step=val["step"], **{f"val_{k}": val["validation"][k] for k in
                                                ("loss", "mlm_loss", "perplexity", "mlm_acc", "nsp_acc")})
        return out

    def close(self, summary: dict | None = None, finished: bool = True) -> None:
        """``finished``: False for a run stopped early (preempted), so MLflow/W&B mark it as not finished."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if summary is not None:
            self.jsonl.write(json.dumps({"summary": summary}) + "\n")
            lines = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()]
            print("run summary | " + " | ".join(lines), flush=True)
        self.jsonl.close()
        if self.tracker is not None:
            self.tracker.close(summary, finished)
