"""Fixtures for the launcher tests: a small multi-file corpus and shards made from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_testlib import REPO


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The packaged demo corpus split into 3 text files (documents are separated by blank lines)."""
    docs = (REPO / "data_prep" / "samples" / "demo_corpus.txt").read_text(encoding="utf-8").split("\n\n")
    out = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (out / f"part{i}.txt").write_text("\n\n".join(docs[i::3]).strip() + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def vocab_dir(minilm_dir) -> Path:
    return minilm_dir


@pytest.fixture(scope="session")
def shards(corpus, vocab_dir, tmp_path_factory) -> Path:
    """Shards made in-process by data_prep (for launchers that only need some data)."""
    from data_prep.run import main as prep

    out = tmp_path_factory.mktemp("shards")
    prep([str(corpus), "--output-dir", str(out), "--vocab", str(vocab_dir), "--num-shards", "2", "--workers", "1",
          "--no-progress"])
    return out
