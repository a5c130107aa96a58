"""Opt-in audit log of the samples each rank trained on (``data.log_sample_ids: true``).

``<output_dir>/sample_ids/rank-NNNNN.jsonl``: one line per micro-batch, ``{"step", "micro", "ids"}`` with the global
sample ids (shard row numbers, as in the NaN report). A multi-node job that was preempted and requeued can then be
checked from files alone: every sample of the planned steps seen once, none lost or repeated across the requeue. On
resume each rank keeps its lines up to the resumed step (steps redone after a hard kill are logged once). Each rank
writes only its own file, so the log needs no coordination; it is flushed per line and closed at the end of the run.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretraining.metrics import truncate_metrics

SUBDIR = "sample_ids"


def path_for(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / SUBDIR / f"rank-{rank:05d}.jsonl"


class SampleIdLog:
    def __init__(self, output_dir: str | Path, rank: int, start_step: int):
        path = path_for(output_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(path, start_step)  # same rule as metrics.jsonl: lines of steps <= the resumed step stay
        self.file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, step: int, micro: int, ids) -> None:
        self.file.write(json.dumps({"step": step, "micro": micro, "ids": [int(i) for i in ids]}) + "\n")

    def close(self) -> None:
        self.file.close()


def read(output_dir: str | Path) -> dict[int, list[dict]]:
    """{rank: [records]} of every rank file in the run's log."""
    out = {}
    for p in sorted((Path(output_dir) / SUBDIR).glob("rank-*.jsonl")):
        out[int(p.stem.split("-")[1])] = [json.loads(line) for line in p.read_text().splitlines() if line]
    return out
