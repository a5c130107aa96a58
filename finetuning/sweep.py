"""Seeds x learning rates for one task, reported as mean +- std (markdown and JSON).

  biobert sweep --task ner --seeds 1 2 3 --learning-rates 5e-5 3e-5 --model DIR --data DIR --output-dir OUT \\
      [any task flag]

Each run goes to OUT/lr{lr}_seed{seed}/ (its own metrics.json, predictions, model); the table to OUT/sweep.{md,json}.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass

from biobert.config import option, parse_suite
from biobert.errors import run
from biobert.files import atomic_write, atomic_write_json
from finetuning.common import headline
from finetuning.config import build_task
from finetuning.evaluate_all import CONFIGS, SCORES, run_task


def run_record(lr: float, seed: int, output_dir: str, metrics: dict, keys: tuple[str, ...]) -> dict:
    """A run's scores for the table: test scores, or dev scores marked as dev-only when the task has no test."""
    scores, split = headline(metrics, keys)
    if split == "none":
        raise ValueError(f"{output_dir}/metrics.json: no {', '.join(keys)} (a run of another task?)")
    return {"learning_rate": lr, "seed": seed, "output_dir": output_dir, "split": split,
            **{k: scores[k] for k in keys}}


def aggregate(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per learning rate: mean and sample std over seeds of each score."""
    rows = []
    for lr in sorted({r["learning_rate"] for r in runs}, reverse=True):
        group = [r for r in runs if r["learning_rate"] == lr]
        row = {"learning_rate": lr, "seeds": [r["seed"] for r in group]}
        for k in keys:
            values = [r[k] for r in group]
            row[k] = statistics.fmean(values)
            row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict], keys: tuple[str, ...], split: str = "test") -> str:
    head = "| learning rate | seeds | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = " | ".join(f"{100 * r[k]:.2f} +- {100 * r[k + '_std']:.2f}" for k in keys)
        lines.append(f"| {r['learning_rate']:g} | {len(r['seeds'])} | {cells} |")
    if split != "test":
        lines += ["", "DEV ONLY: the task has no test split (and --test-holdout 0): these are dev scores, the same dev "
                  "set that chose each run's epoch; they are not test scores."]
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class SweepConfig:
    """Seeds x learning rates for one task; every other flag is the task's."""

    task: str = option(help="which fine-tuning task", choices=("ner", "re", "qa"))
    seeds: list[int] = option(factory=lambda: [1, 2, 3], help="one run per seed and learning rate")
    learning_rates: list[float] | None = option(None, "learning rates to try (default: the task's --learning-rate)")


def main(cfg: SweepConfig, task_values: dict) -> dict:
    base = build_task(CONFIGS[cfg.task], task_values)  # --recipe and any task flag
    keys = SCORES[cfg.task]
    runs = []
    for lr in cfg.learning_rates or [base.learning_rate]:
        for seed in cfg.seeds:
            out = os.path.join(base.output_dir, f"lr{lr:g}_seed{seed}")
            run_cfg = dataclasses.replace(base, learning_rate=lr, seed=seed, output_dir=out)
            metrics = run_task(run_cfg, cfg.task)
            runs.append(run_record(lr, seed, out, metrics, keys))
    rows = aggregate(runs, keys)
    split = "test" if all(r["split"] == "test" for r in runs) else "dev"
    result = {"task": cfg.task, "split": split, "runs": runs, "table": rows}
    atomic_write_json(os.path.join(base.output_dir, "sweep.json"), result)
    atomic_write(os.path.join(base.output_dir, "sweep.md"), markdown(rows, keys, split))
    print(markdown(rows, keys, split))
    return result


def cli(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]  # the old `-- TASK FLAGS` form
    cfg, task_values = parse_suite(SweepConfig, CONFIGS.values(), argv, prog="biobert sweep", description=__doc__)
    main(cfg, task_values)
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
