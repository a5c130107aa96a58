"""Fixtures for the fine-tuning tests: the packaged MiniLM tokenizer and a tiny-thread torch."""

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from finetuning.common import load_tokenizer

    return load_tokenizer(minilm_dir)


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    torch.set_num_threads(2)
