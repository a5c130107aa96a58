"""A fine-tuning sweep (learning rates x seeds) as a Slurm array: which run is task I, and the table once all are done.

    python -m launch.sweep_parts run --index I --lrs 5e-5 3e-5 --seeds 1 2 3      # "LR SEED DIRNAME" of run I
    python -m launch.sweep_parts collect OUT --task ner --lrs 5e-5 3e-5 --seeds 1 2 3

Run I is (lrs[I // len(seeds)], seeds[I % len(seeds)]) and writes OUT/lr{lr}_seed{seed}: the layout of
`finetuning/sweep.py`, whose table code `collect` reuses, so an array sweep and a one-job sweep give the same
OUT/sweep.{json,md}. `collect` exits 3 while some run has no metrics.json yet (the last task to finish writes it).
"""

from __future__ import annotations

import fcntl
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse_command
from biobert.errors import run

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
            run_dir = out / run_dir_name(lr, seed)
            try:
                metrics = json.loads((run_dir / "metrics.json").read_text())
            except FileNotFoundError:
                return None
            runs.append(run_record(lr, seed, str(run_dir), metrics, keys))
    rows = aggregate(runs, keys)
    split = "test" if all(r["split"] == "test" for r in runs) else "dev"
    result = {"task": task, "split": split, "runs": runs, "table": rows}
    atomic_write_json(out / "sweep.json", result)
    atomic_write(out / "sweep.md", markdown(rows, keys, split))
    return result


TASKS = ("ner", "re", "qa")  # = finetuning.evaluate_all.SCORES (not imported here: `run` stays torch-free)


@dataclass(kw_only=True)
class IndexConfig:
    """Print "LR SEED DIRNAME" of array task INDEX's run."""

    index: int = option(help="this array task's index, 0-based (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    lrs: list[float] = option(help="the sweep's learning rates")
    seeds: list[int] = option(help="the sweep's seeds")

    def __post_init__(self) -> None:
        if not self.lrs or not self.seeds:
            raise ValueError("give at least one learning rate (--lrs) and one seed (--seeds)")
        run_for_index(self.index, self.lrs, self.seeds)  # the index must name a run: the --array range hint if not


@dataclass(kw_only=True)
class CollectConfig:
    """Write OUT_DIR/sweep.{json,md} once every run has its metrics.json; exit 3 before that."""

    out_dir: str = option(help="the sweep directory that holds the runs' lr{lr}_seed{seed} directories",
                          positional=True)
    task: str = option(help="the runs' task, ner | re | qa (its scores go in the table)", choices=TASKS)
    lrs: list[float] = option(help="the sweep's learning rates")
    seeds: list[int] = option(help="the sweep's seeds")

    def __post_init__(self) -> None:
        if not self.lrs or not self.seeds:
            raise ValueError("give at least one learning rate (--lrs) and one seed (--seeds)")


COMMANDS = {"run": IndexConfig, "collect": CollectConfig}


def main(cfg: IndexConfig | CollectConfig) -> tuple[float, int] | dict | None:
    """run: (lr, seed) of the array task. collect: the sweep table, or None while some run is not finished."""
    if isinstance(cfg, IndexConfig):
        return run_for_index(cfg.index, cfg.lrs, cfg.seeds)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".collect.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return collect(out, cfg.task, cfg.lrs, cfg.seeds)


def cli(argv: list[str] | None = None) -> int:
    """Exit 0 done, 3 collect: some run not finished yet, 2 a mistake (one line, via biobert.errors.run)."""
    cfg = parse_command(COMMANDS, argv, prog="python -m launch.sweep_parts", description=__doc__)
    result = main(cfg)
    if isinstance(cfg, IndexConfig):
        lr, seed = result
        print(f"{lr:g} {seed} {run_dir_name(lr, seed)}")
        return 0
    if result is None:
        print(f"sweep_parts: {cfg.out_dir}: some runs are not finished; the last task to finish writes the table")
        return NOT_READY
    print((Path(cfg.out_dir) / "sweep.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
