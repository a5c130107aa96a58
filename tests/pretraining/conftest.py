"""Fixtures shared by the fault-tolerance modules (requested by name, so other pretraining tests keep their threads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Module scope, requested through `pytestmark`: set before a module's `straight` run, so the straight and the
    resumed runs share one thread and therefore one float reduction order (bit-exact comparisons)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ef.synthetic_shards(tmp_path_factory.getbasetemp())
