"""Helpers shared by the launcher tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", "tiny_cpu"]  # packaged recipes, found by name from any directory
TINY_ENV = {"CONFIG": "tiny_cpu", "DEVICE": "cpu"}
GLOBAL_BATCH = 8  # ds_configs/tiny_cpu.json train_batch_size


def run_overrides(shard_dir: Path, out_dir: Path, max_steps: int) -> list[str]:
    return [f"data.shard_dir={shard_dir}", f"output_dir={out_dir}", f"max_steps={max_steps}",
            "checkpoint.every_steps=1000", "logging.progress_bar=false", "logging.tensorboard=false"]




def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, end-of-run summaries) of <out_dir>/metrics.jsonl."""
    steps, summaries = [], []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (summaries.append(rec["summary"]) if "summary" in rec else steps.append(rec))
    return steps, summaries


def assert_continuous(records: list[dict], max_steps: int) -> None:
    """Steps 1..max_steps each exactly once, in order, and the data position advancing one global batch per step."""
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    assert [r["samples_consumed"] for r in records] == [GLOBAL_BATCH * s for s in range(1, max_steps + 1)]
    assert all(r["samples"] == GLOBAL_BATCH for r in records)
