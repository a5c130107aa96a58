"""The demo's NER data: a small real sample of the NCBI disease corpus, shipped in data_prep/samples/ncbi_disease/
(source and licence in SOURCE.md there), and the function that cut it from the full corpus, so it can be re-made
and checked byte for byte:

    python -m launch.demo_ner ../shared/data/ner/NCBI-disease-IOB data_prep/samples/ncbi_disease

Sentences are drawn by a seeded random choice from each split (train/devel/test kept apart, their order kept), whole
and unchanged: a sample, not a rewrite. The full corpus is far larger (5,424 / 923 / 940 sentences); scores on the
sample are small-data scores with wide seed-to-seed spread, not the paper's numbers.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from biobert.files import atomic_write

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data_prep" / "samples" / "ncbi_disease"
SIZES = (("train", 400), ("devel", 100), ("test", 200))
SEED = 13


def sample_dir() -> Path:
    """The shipped sample (package data of data_prep, so it is there in an installed wheel too)."""
    import data_prep

    return Path(data_prep.__file__).resolve().parent / "samples" / "ncbi_disease"


def make_sample(src_dir: str | Path, out_dir: str | Path, sizes=SIZES, seed: int = SEED) -> Path:
    """OUT/{train,devel,test}.tsv: ``n`` sentences of each split of SRC, seeded, in their original order."""
    out = Path(out_dir)
    for split, n in sizes:
        blocks = [b for b in Path(src_dir, f"{split}.tsv").read_text(encoding="utf-8").split("\n\n") if b.strip()]
        if n > len(blocks):
            raise ValueError(f"{src_dir}/{split}.tsv has {len(blocks)} sentences, fewer than the {n} asked for")
        keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(blocks)), n))
        atomic_write(out / f"{split}.tsv", "\n\n".join(blocks[i].strip("\n") for i in keep) + "\n")
    return out


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m launch.demo_ner NCBI_DISEASE_IOB_DIR OUT_DIR", file=sys.stderr)
        return 2
    print(make_sample(*argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
