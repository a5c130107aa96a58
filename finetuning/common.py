"""Small pieces every task entrypoint shares: task files, tokenizer, subsampling, atomic outputs, the results line."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from biobert.errors import UserError

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
        raise UserError(f"--data {data_dir!r} is not a directory: give the task directory holding the train/dev/test "
                        "files")
    return p


def load_tokenizer(model_dir: str | Path):
    """The model directory's own tokenizer, checked against the model: a directory without tokenizer files would
    otherwise get transformers' bare special-token tokenizer, turning every word into [UNK] and scoring 0 silently."""
    from transformers import AutoTokenizer, BertConfig

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise UserError(f"{model_dir} has no tokenizer (vocab.txt or tokenizer.json): copy the tokenizer files of the "
                        "model it was trained from into it")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    vocab_size = BertConfig.from_json_file(str(model_dir / "config.json")).vocab_size
    if not 0.9 * vocab_size <= len(tokenizer) <= vocab_size:
        raise UserError(f"{model_dir}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab_size}: the tokenizer files belong to another model; copy the right ones in")
    return tokenizer


def trained_labels(model_dir: Path, head_key: str, what: str, looks_right=lambda labels: True) -> list[str]:
    """Label list of an already fine-tuned model (for --no-do-train), or a UserError when it has no such head."""
    from transformers import BertConfig

    from finetuning.heads import checkpoint_keys

    id2label = BertConfig.from_json_file(str(model_dir / "config.json")).id2label
    labels = [id2label[i] for i in range(len(id2label))]
    if head_key not in checkpoint_keys(model_dir) or not looks_right(labels):
        raise UserError(f"{model_dir} has no fine-tuned {what} head (labels {labels[:4]}): fine-tune it first "
                        f"(--do-train, the default), or point --model at a model fine-tuned for {what}")
    return labels


def subsample(items: Sequence, n: int | None, seed: int) -> list:
    """A seeded random subset of n items in their original order (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def split_off_test(items: Sequence, fraction: float, seed: int, labels: Sequence | None = None) -> tuple[list, list]:
    """(kept, held out): a seeded ``fraction`` of ``items`` (at least one), stratified by ``labels`` when given, both in
    their original order. For a task without a test split: its test comes from train, never from dev (dev picks the
    epoch, so a dev score is not a test score)."""
    groups: dict = {}
    for i, lab in enumerate(labels if labels is not None else [None] * len(items)):
        groups.setdefault(lab, []).append(i)
    rng = random.Random(f"test-holdout:{seed}")
    held: set[int] = set()
    for key in sorted(groups, key=str):
        idx = groups[key]
        held.update(rng.sample(idx, round(len(idx) * fraction)))
    if not held and items:
        held.add(rng.randrange(len(items)))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def held_out_source(path, fraction: float, seed: int, unit: str, stratified: bool = False) -> str:
    how = ", stratified by label" if stratified else ""
    return f"{Path(path).name}: {fraction:.0%} of its {unit} held out as test (seed {seed}{how}); train is the rest"


def headline(metrics: dict, keys: Sequence[str]) -> tuple[dict, str]:
    """The scores to report and which split they are from: "test" (a test split, a held-out part of train, or the
    cross-validation folds' mean), else "dev" (dev-only: also what chose the epoch, so never to be read as test), else
    "none"."""
    if all(k in metrics for k in keys):
        return {k: metrics[k] for k in metrics if k.split("_std")[0] in keys}, "test"
    if isinstance(metrics.get("dev"), dict) and all(k in metrics["dev"] for k in keys):
        return {k: metrics["dev"][k] for k in keys}, "dev"
    return {}, "none"


def no_test_note(data_dir) -> str:
    return (f"{data_dir} has no test split and --test-holdout is 0: no test score (dev scores, which also chose the "
            "epoch, are under 'dev')")



def results_line(task: str, metrics: dict, keys: Sequence[str]) -> str:
    if any(k in metrics for k in keys):
        return f"RESULT {task}: " + " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
    dev = metrics.get("dev") or {}
    return (f"RESULT {task}: no test score; dev only (it also chose the epoch): "
            + " ".join(f"{k}={dev[k]:.4f}" for k in keys if k in dev))


def no_learning_warning(what: str, split: str, cfg) -> str:
    """The one line a run prints (and metrics.json keeps) when training ended on a degenerate model."""
    return (f"warning: {what} on {split} after {cfg.epochs:g} epochs at learning rate {cfg.learning_rate:g}: the "
            f"model has not learned the task yet (too little signal for these settings); likely remedies: more "
            f"epochs (--epochs {max(10, 2 * cfg.epochs):g}, or --recipe biobert), a higher learning rate "
            f"(--learning-rate {2 * cfg.learning_rate:g}), more training examples")
