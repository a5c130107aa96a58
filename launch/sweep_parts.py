"""A fine-tuning sweep (learning rates x seeds) as a Slurm array: which run is task I, and the table once all are done.

    python -m launch.sweep_parts run --index I --lrs 5e-5 3e-5 --seeds 1 2 3      # "LR SEED DIRNAME" of run I
    python -m launch.sweep_parts collect OUT --task ner --lrs 5e-5 3e-5 --seeds 1 2 3

Run I is (lrs[I // len(seeds)], seeds[I % len(seeds)]) and writes OUT/lr{lr}_seed{seed}: the layout of
`finetuning/sweep.py`, whose table code `collect` reuses, so an array sweep and a one-job sweep give the same
OUT/sweep.{json,md}. `collect` exits 3 while some run has no metrics.json yet (the last task to finish writes it).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from pathlib import Path

NOT_READY = 3


def run_dir_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}_seed{seed}"  # = finetuning/sweep.py


def run_for_index(index: int, lrs: list[float], seeds: list[int]) -> tuple[float, int]:
    total = len(lrs) * len(seeds)
    if not 0 <= index < total:
        raise ValueError(f"array index {index} outside the sweep's {len(lrs)} lrs x {len(seeds)} seeds: use "
                         f"--array=0-{total - 1}")
    return lrs[index // len(seeds)], seeds[index % len(seeds)]


def collect(out_dir: str | Path, task: str, lrs: list[float], seeds: list[int]) -> dict | None:
    from biobert.files import atomic_write, atomic_write_json
    from finetuning.evaluate_all import SCORES
    from finetuning.sweep import aggregate, markdown, run_record

    out, keys, runs = Path(out_dir), SCORES[task], []
    for lr in lrs:
        for seed in seeds:
            run = out / run_dir_name(lr, seed)
            try:
                metrics = json.loads((run / "metrics.json").read_text())
            except FileNotFoundError:
                return None
            runs.append(run_record(lr, seed, str(run), metrics, keys))
    rows = aggregate(runs, keys)
    split = "test" if all(r["split"] == "test" for r in runs) else "dev"
    result = {"task": task, "split": split, "runs": runs, "table": rows}
    atomic_write_json(out / "sweep.json", result)
    atomic_write(out / "sweep.md", markdown(rows, keys, split))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--index", type=int, required=True)
    c = sub.add_parser("collect")
    c.add_argument("out_dir")
    c.add_argument("--task", required=True)
    for sp in (r, c):
        sp.add_argument("--lrs", type=float, nargs="+", required=True)
        sp.add_argument("--seeds", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        try:
            lr, seed = run_for_index(args.index, args.lrs, args.seeds)
        except ValueError as e:
            print(f"sweep_parts: {e}", file=sys.stderr)
            return 2
        print(f"{lr:g} {seed} {run_dir_name(lr, seed)}")
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".collect.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = collect(out, args.task, args.lrs, args.seeds)
        except ValueError as e:
            print(f"sweep_parts: {e}", file=sys.stderr)
            return 2
    if result is None:
        print(f"sweep_parts: {out}: some runs are not finished; the last task to finish writes the table")
        return NOT_READY
    print((out / "sweep.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
