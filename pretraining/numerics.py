"""Numerical health of a run: non-finite losses, fp16 overflow skips, loss spikes. Pure bookkeeping, unit-testable.

fp16: DeepSpeed's dynamic loss scaler skips a step whose gradients overflowed (and lowers the scale); the engine counts
those in ``engine.skipped_steps`` (saved and restored with the checkpoint). A non-finite loss is tolerated only on such
a skipped step (the scaler had its chance), and only ``max_overflow_streak`` times in a row. Without fp16 nothing skips:
a non-finite loss stops the run at once (before it is checkpointed). A loss spike (loss > ``spike_factor`` x the
median of the last ``spike_window`` finite losses) does not stop anything: it is flagged in the metrics
(``loss_spike``) and warned about, so a bad shard or a too-high lr shows up where it started.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

import numpy as np

log = logging.getLogger(__name__)

OK, SKIPPED, STOP = "ok", "skipped", "stop"


class NumericsMonitor:
    def __init__(self, *, fp16: bool, skipped_steps: int = 0, spike_factor: float = 2.0, spike_window: int = 50,
                 spike_min_history: int = 10, max_overflow_streak: int = 50):
        self.fp16 = fp16
        self.skipped_steps = skipped_steps  # the engine's count when we started (restored by a resume)
        self.spike_factor, self.spike_min_history = spike_factor, spike_min_history
        self.history: deque[float] = deque(maxlen=spike_window)
        self.max_overflow_streak = max_overflow_streak
        self.overflow_streak = 0
        self.reason = ""

    def update(self, step: int, loss: float, skipped_steps: int) -> tuple[str, dict]:
        """-> (verdict, metric fields). ``skipped_steps``: the engine's running count after this step."""
        skipped_now = skipped_steps > self.skipped_steps
        self.skipped_steps = skipped_steps
        fields = {"skipped_steps": skipped_steps, "overflow": skipped_now, "loss_spike": False}
        self.overflow_streak = self.overflow_streak + 1 if skipped_now else 0
        if self.overflow_streak > self.max_overflow_streak:
            self.reason = (f"{self.overflow_streak} overflow-skipped steps in a row up to step {step}: the loss scale "
                           "cannot recover (lower the lr, enable clipping, or use bf16)")
            return STOP, fields
        if not math.isfinite(loss):
            if self.fp16 and skipped_now:
                return SKIPPED, fields  # the scaler skipped this step and lowered the scale
            self.reason = f"non-finite loss {loss} at step {step}" + (
                " and the fp16 loss scaler did not skip the step" if self.fp16 else "")
            return STOP, fields
        if len(self.history) >= self.spike_min_history:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                fields["loss_spike"] = True
                log.warning("loss spike at step %d: %.4g > %.3g x running median %.4g", step, loss, self.spike_factor,
                            median)
        self.history.append(loss)
        return (SKIPPED if skipped_now else OK), fields


def shard_of(manifest, sample_ids) -> list[str]:
    """'shard file rows [...]' for each shard the global sample ids fall in (ids are offsets in manifest order)."""
    sizes = np.array([s.samples for s in manifest.shards], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.asarray(sample_ids, dtype=np.int64)
    where = np.searchsorted(first, ids, side="right") - 1
    out = []
    for k in np.unique(where):
        rows = (ids[where == k] - first[k]).tolist()
        out.append(f"{manifest.shards[int(k)].file} rows {rows[:8]}{' ...' if len(rows) > 8 else ''}")
    return out


def nonfinite_message(step: int, reason: str, reports: list[dict], shard_dir, manifest) -> str:
    """The error for a stopped run. ``reports``: one per rank, {rank, losses: per micro-batch, sample_ids: per micro}."""
    lines = [f"{reason} (shards {shard_dir}); the run stopped before checkpointing this step."]
    for r in reports:
        bad = [i for i, x in enumerate(r["losses"]) if not math.isfinite(x)]
        if not bad:
            continue
        ids = [i for m in bad for i in r["sample_ids"][m]]
        lines.append(f"rank {r['rank']}: non-finite loss in micro-batch(es) {bad}, sample ids {ids[:16]} -> "
                     + "; ".join(shard_of(manifest, ids)))
    if len(lines) == 1:  # finite micro-batch losses, non-finite sum/overflow streak: name the last batches anyway
        for r in reports:
            ids = [i for m in r["sample_ids"] for i in m]
            lines.append(f"rank {r['rank']}: last sample ids {ids[:16]} -> " + "; ".join(shard_of(manifest, ids)))
    lines.append("Lower the lr, enable clipping, or inspect those samples.")
    return "\n  ".join(lines)
