"""Seeds x learning rates for one task, reported as mean +- std (markdown and JSON).

  python finetuning/sweep.py --task ner --seeds 1 2 3 --learning-rates 5e-5 3e-5 -- --model DIR --data DIR \\
      --output-dir OUT [any task flag]

Each run goes to OUT/lr{lr}_seed{seed}/ (its own metrics.json, predictions, model); the table to OUT/sweep.{md,json}.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # finetuning/ on sys.path would shadow the stdlib `re` with finetuning/re.py
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import dataclasses
import statistics

from finetuning.common import write_json, write_text
from finetuning.config import parse_config
from finetuning.evaluate_all import CONFIGS, SCORES, run_task


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


def markdown(rows: list[dict], keys: tuple[str, ...]) -> str:
    head = "| learning rate | seeds | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = " | ".join(f"{100 * r[k]:.2f} +- {100 * r[k + '_std']:.2f}" for k in keys)
        lines.append(f"| {r['learning_rate']:g} | {len(r['seeds'])} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None)
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    cls = CONFIGS[args.task]
    base = parse_config(cls, rest)  # --recipe and any task flag
    keys = SCORES[args.task]
    runs = []
    for lr in args.learning_rates or [base.learning_rate]:
        for seed in args.seeds:
            out = os.path.join(base.output_dir, f"lr{lr:g}_seed{seed}")
            cfg = dataclasses.replace(base, learning_rate=lr, seed=seed, output_dir=out)
            metrics = run_task(cfg, args.task)
            runs.append({"learning_rate": lr, "seed": seed, "output_dir": out, **{k: metrics[k] for k in keys}})
    rows = aggregate(runs, keys)
    result = {"task": args.task, "runs": runs, "table": rows}
    write_json(os.path.join(base.output_dir, "sweep.json"), result)
    write_text(os.path.join(base.output_dir, "sweep.md"), markdown(rows, keys))
    print(markdown(rows, keys))
    return result


if __name__ == "__main__":
    main()
