"""Small pieces every task entrypoint shares: task files, tokenizer, subsampling, atomic outputs, the results line."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from data_prep.contract import atomic_write_text

SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "devel", "validation", "valid"), "test": ("test",)}


def find_split(data_dir: str | Path, split: str, exts: Sequence[str]) -> Path | None:
    """The train/dev/test file of a task directory ({name}{ext}; dev also as devel/validation), or None."""
    for name in SPLIT_NAMES[split]:
        for ext in exts:
            p = Path(data_dir) / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def require_data_dir(data_dir: str) -> Path:
    p = Path(data_dir)
    if not data_dir or not p.is_dir():
        raise FileNotFoundError(f"--data {data_dir!r} is not a directory")
    return p


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def subsample(items: Sequence, n: int | None, seed: int) -> list:
    """A seeded random subset of n items in their original order (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def write_json(path: str | Path, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def results_line(task: str, metrics: dict, keys: Sequence[str]) -> str:
    return f"RESULT {task}: " + " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def no_learning_warning(what: str, split: str, cfg) -> str:
    """The one line a run prints (and metrics.json keeps) when training ended on a degenerate model."""
    return (f"warning: {what} on {split} after {cfg.epochs:g} epochs at learning rate {cfg.learning_rate:g}: the "
            f"model has not learned the task yet (too little signal for these settings); likely remedies: more "
            f"epochs (--epochs {max(10, 2 * cfg.epochs):g}, or --recipe biobert), a higher learning rate "
            f"(--learning-rate {2 * cfg.learning_rate:g}), more training examples")
