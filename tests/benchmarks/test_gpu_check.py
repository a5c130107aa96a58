"""gpu_check on a machine without CUDA: a clear skip, exit 0, a results file that says so."""

from __future__ import annotations

import json

import torch

from benchmarks import gpu_check


def test_no_cuda_skips_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--output", str(out)]) == 0
    assert "no CUDA device: skipped" in capsys.readouterr().out
    assert json.loads(out.read_text()) == {"skipped": True, "reason": gpu_check.SKIP_MESSAGE}


def test_synthetic_batch_is_a_valid_pretraining_batch():
    """The checks' input: masked positions inside each sequence's real length, never [CLS], sorted."""
    b = gpu_check._batch(gpu_check._tiny_config(), 6, 64, "cpu", padded=True, seed=3)
    lengths = b["attention_mask"].sum(1)
    assert (lengths < 64).any() and (lengths >= 16).all()
    pos = b["masked_lm_positions"]
    assert (pos >= 1).all() and (pos < lengths[:, None]).all()
    assert (pos[:, 1:] > pos[:, :-1]).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    full = gpu_check._batch(gpu_check._tiny_config(), 2, 32, "cpu", padded=False)
    assert bool(full["attention_mask"].all())
