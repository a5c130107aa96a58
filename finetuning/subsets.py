"""Dense and sparse NER training subsets, for learning curves and low-resource checks.

    python -m finetuning.subsets SRC_DIR OUT_DIR --first 1450 [--entity-fraction 0.12 --seed 0]

A *dense* subset is the first N training sentences (about half of NCBI-disease's sentences name a disease). A *sparse*
one thins it: every entity-free sentence is kept and entity-bearing ones are dropped at random (seeded) until
``entity_fraction`` of the sentences carry an entity -- the regime where a fine-tune can collapse to all-O.
The dev and test files are copied unchanged, so scores stay comparable with the full set.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from data_prep.contract import atomic_write_text


def split_sentences(text: str) -> list[str]:
    """Blank-line separated blocks of a token-per-line file (each without its trailing blank line)."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def has_entity(block: str) -> bool:
    return any(line.split()[-1] != "O" for line in block.splitlines() if not line.startswith("-DOCSTART-"))


def thin(blocks: list[str], entity_fraction: float, seed: int) -> list[str]:
    """Keep every entity-free block and a seeded random set of entity-bearing ones so that about ``entity_fraction``
    of the result carries an entity; the original order is kept."""
    if not 0 < entity_fraction < 1:
        raise ValueError(f"entity_fraction must be in (0, 1), got {entity_fraction}")
    with_entity = [i for i, b in enumerate(blocks) if has_entity(b)]
    empty = len(blocks) - len(with_entity)
    want = min(len(with_entity), max(1, round(entity_fraction * empty / (1 - entity_fraction))))
    keep = set(random.Random(seed).sample(with_entity, want))
    return [b for i, b in enumerate(blocks) if i in keep or i not in with_entity]


def make_subset(src: str | Path, out: str | Path, first: int | None = None, entity_fraction: float | None = None,
                seed: int = 0) -> dict:
    """Write OUT/train.tsv (first N sentences of SRC's train, optionally thinned) and copy dev/test. -> statistics."""
    src, out = Path(src), Path(out)
    train = next((src / n for n in ("train.tsv", "train.txt", "train.iob", "train.conll") if (src / n).is_file()), None)
    if train is None:
        raise FileNotFoundError(f"{src}: no train.tsv (expected a token-per-line NER directory)")
    blocks = split_sentences(train.read_text(encoding="utf-8"))[:first]
    if entity_fraction is not None:
        blocks = thin(blocks, entity_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("train."):
            shutil.copy2(f, out / f.name)
    atomic_write_text(out / "train.tsv", "\n\n".join(blocks) + "\n\n")
    n_ent = sum(has_entity(b) for b in blocks)
    return dict(sentences=len(blocks), with_entity=n_ent, entity_fraction=n_ent / max(1, len(blocks)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--first", type=int, default=None, help="keep the first N training sentences")
    p.add_argument("--entity-fraction", type=float, default=None, help="thin to this share of entity sentences")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        print(make_subset(args.src, args.out, args.first, args.entity_fraction, args.seed))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
