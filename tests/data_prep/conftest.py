"""Fixtures for data_prep tests: vocabs (the packaged uncased MiniLM one and a tiny cased one) and small corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.demo import DEMO_CORPUS
from data_prep.wordpiece import SPECIAL_TOKENS


@pytest.fixture(scope="session")
def uncased_vocab(minilm_dir) -> Path:
    return minilm_dir / "vocab.txt"


@pytest.fixture(scope="session")
def cased_vocab(tmp_path_factory) -> Path:
    """A small cased vocab: special tokens, characters of both cases, some whole words and ## pieces."""
    d = tmp_path_factory.mktemp("cased_vocab")
    chars = [chr(c) for c in range(33, 127)]
    words = ["The", "the", "BRCA", "##1", "gene", "TP", "##53", "Patients", "patients", "cells", "were", "was", "in",
             "of", "and", "a", "with", "treated", "mutation", "##s", "##ing", "##ed", "DNA", "dna", "protein"]
    tokens = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars if c.isalnum()] + words
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return d / "vocab.txt"


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    return DEMO_CORPUS
