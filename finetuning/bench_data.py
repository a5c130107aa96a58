"""Deterministic NER subsets for benchmarks and tests: a dense prefix and a sparse ("thinned") variant of a corpus.

Sparse entity types (species, rare chemicals) are where fine-tuning recipes break: most sentences carry no entity, so
the all-O solution is a deep, early loss minimum. The shared disease corpora are dense (~55% of sentences have an
entity); thinning keeps every entity-free sentence and a seeded sample of the entity-bearing ones, so a set with the
density of a sparse corpus can be built from data every machine has.

    biobert subset ner/NCBI-disease-IOB ncbi_sparse --n-train 1400 --entity-fraction 0.12
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse
from biobert.errors import UserError, run
from biobert.files import atomic_write
from finetuning.ner_data import NERFile, Sentence, conll_text, read_conll


def has_entity(s: Sentence) -> bool:
    return any(t != "O" for t in s.tags)


def thin(sentences: Sequence[Sentence], n: int, entity_fraction: float | None, seed: int) -> list[Sentence]:
    """``n`` sentences in file order. ``entity_fraction`` None: the first n. Else the first round(n * (1 - f))
    entity-free sentences plus a seeded sample of round(n * f) entity-bearing ones drawn from the same stretch of the
    file (so both come from the same documents)."""
    if entity_fraction is None:
        return list(sentences[:n])
    if not 0 <= entity_fraction <= 1:
        raise ValueError(f"entity_fraction must be in [0, 1], got {entity_fraction}")
    n_ent = round(n * entity_fraction)
    free = [i for i, s in enumerate(sentences) if not has_entity(s)][: n - n_ent]
    stretch_end = free[-1] + 1 if free else len(sentences)
    ents = [i for i, s in enumerate(sentences) if has_entity(s)]
    pool = [i for i in ents if i < stretch_end]
    if len(pool) < n_ent:
        pool = ents
    if len(free) < n - n_ent or len(pool) < n_ent:
        raise ValueError(f"{len(sentences)} sentences cannot give {n} with an entity fraction of {entity_fraction}")
    keep = sorted(free + random.Random(seed).sample(pool, n_ent))
    return [sentences[i] for i in keep]


def write_subset(src: str | Path, dst: str | Path, n_train: int, entity_fraction: float | None = None,
                 n_eval: int | None = None, seed: int = 0) -> Path:
    """DST/{train,devel,test}.tsv from the corpus in SRC: train thinned as ``thin``; dev/test the first ``n_eval``
    sentences (all when None), at the corpus's own density. Same arguments, same files."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "devel", "test"):
        f = read_conll(src / f"{split}.tsv")
        if split == "train":
            sentences = thin(f.sentences, n_train, entity_fraction, seed)
        else:
            sentences = f.sentences[:n_eval] if n_eval else f.sentences
        sentences = [Sentence(s.tokens, s.tags, s.prefixes, s.first_line) for s in sentences]  # no -DOCSTART- lines
        out = NERFile(str(dst / f"{split}.tsv"), sentences, f.scheme)
        atomic_write(dst / f"{split}.tsv", conll_text(out, [s.tags for s in sentences]))
    return dst


def density(sentences: Sequence[Sentence]) -> tuple[int, int, float]:
    """(entities, sentences with one, their fraction)."""
    ents = sum(sum(t.startswith("B-") for t in s.tags) for s in sentences)
    with_ent = sum(has_entity(s) for s in sentences)
    return ents, with_ent, with_ent / max(1, len(sentences))


@dataclass(kw_only=True)
class SubsetConfig:
    """A dense (first N sentences) or sparse (entity-thinned) NER training subset; dev/test kept at their density."""

    src: str = option(help="a token-per-line NER directory with train.tsv, devel.tsv and test.tsv", positional=True)
    out: str = option(help="where the subset's train/devel/test.tsv go", positional=True)
    n_train: int = option(help="training sentences in the subset")
    entity_fraction: float | None = option(None, "share of training sentences with an entity (default: the corpus's "
                                                 "own, i.e. the first N sentences)")
    n_eval: int | None = option(None, "dev/test sentences kept (default: all)")
    seed: int = option(0, "seeds the sample of entity-bearing sentences")


def main(cfg: SubsetConfig) -> dict:
    for split in ("train", "devel", "test"):
        if not (Path(cfg.src) / f"{split}.tsv").is_file():
            raise UserError(f"{cfg.src}: no {split}.tsv (expected a token-per-line NER directory), give the corpus "
                            "directory")
    out = write_subset(cfg.src, cfg.out, cfg.n_train, cfg.entity_fraction, cfg.n_eval, cfg.seed)
    ents, with_ent, frac = density(read_conll(out / "train.tsv").sentences)
    result = {"out": str(out), "entities": ents, "sentences_with_entity": with_ent, "entity_fraction": round(frac, 4)}
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return result


def cli(argv: list[str] | None = None) -> int:
    main(parse(SubsetConfig, argv, prog="biobert subset", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
