"""Deterministic dense / sparse NER subsets (finetuning/bench_data.py) for the parity benchmark and its tests."""

import pytest

from finetuning.bench_data import density, has_entity, thin, write_subset
from finetuning.ner_data import Sentence, read_conll


def _sents(pattern: str) -> list[Sentence]:
    """'EOOE...': a sentence with (E) or without (O) an entity, in file order."""
    return [Sentence([f"w{i}"], ["B-X" if c == "E" else "O"], [f"w{i}\t"], i + 1) for i, c in enumerate(pattern)]


def test_thin_hits_the_fraction_keeps_order_and_is_seeded():
    sents = _sents("EO" * 50 + "E" * 20)  # 70 with an entity, 50 without
    out = thin(sents, 40, 0.25, seed=3)
    assert len(out) == 40 and sum(map(has_entity, out)) == 10
    lines = [s.first_line for s in out]
    assert lines == sorted(lines)  # file order
    assert [s.first_line for s in thin(sents, 40, 0.25, seed=3)] == lines  # same seed, same subset
    assert [s.first_line for s in thin(sents, 40, 0.25, seed=4)] != lines
    free = [s for s in out if not has_entity(s)]
    assert [s.first_line for s in free] == [2 * i + 2 for i in range(30)]  # the first 30 entity-free, all kept
    assert max(s.first_line for s in out) <= 60  # entity sentences drawn from the same stretch of the file
    assert thin(sents, 7, None, seed=0) == sents[:7]
    with pytest.raises(ValueError, match="cannot give"):
        thin(sents, 100, 0.1, seed=0)  # only 50 entity-free sentences


def test_write_subset_on_real_corpus(shared_data, tmp_path):
    out = write_subset(shared_data / "ner/NCBI-disease-IOB", tmp_path / "sparse", 300, 0.12, n_eval=50, seed=0)
    train = read_conll(out / "train.tsv")
    ents, with_ent, frac = density(train.sentences)
    assert len(train.sentences) == 300 and with_ent == 36 and frac == pytest.approx(0.12) and ents >= 36
    assert len(read_conll(out / "test.tsv").sentences) == 50 and len(read_conll(out / "devel.tsv").sentences) == 50
    again = write_subset(shared_data / "ner/NCBI-disease-IOB", tmp_path / "again", 300, 0.12, n_eval=50, seed=0)
    assert (again / "train.tsv").read_text() == (out / "train.tsv").read_text()
