"""gpu_check on a machine without CUDA: the CPU-capable checks run and pass, the GPU ones are marked skipped, a wrong
number fails the run (exit 1), and the results file is strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from benchmarks import gpu_numerics as gn


def _strict_load(path):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_no_cuda_runs_the_cpu_parts(tmp_path, no_cuda, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.cli(["--output", str(out), "--skip-benchmark", "--no-compile"]) == 0
    text = capsys.readouterr().out
    assert gpu_check.SKIP_MESSAGE in text and "optimizers: PASS" in text and "host_syncs: SKIP" in text
    report = _strict_load(out)
    assert report["skipped"] is True and report["passed"] is True
    checks = report["checks"]
    assert checks["optimizers"]["lamb_foreach"]["passed"] and checks["optimizers"]["adamw_torch_fused"]["passed"]
    assert checks["optimizers"]["lamb_deepspeed"]["available"] is False
    assert checks["fp16_loss_scale"]["passed"] and checks["fp16_loss_scale"]["skipped_steps"] == 2
    assert checks["attention"]["available"] is False and checks["host_syncs"]["available"] is False


def test_a_wrong_number_fails_the_run(tmp_path, no_cuda, monkeypatch):
    """An optimizer 0.1% off in its step size: the check fails and the script exits 1."""
    from pretraining import optim_foreach

    real = optim_foreach.ForeachLamb._step_sizes
    monkeypatch.setattr(optim_foreach.ForeachLamb, "_step_sizes",
                        lambda self, group, steps: [s * 1.001 for s in real(self, group, steps)])
    out = tmp_path / "gpu.json"
    assert gpu_check.cli(["--output", str(out), "--skip-benchmark", "--no-compile"]) == 1
    report = _strict_load(out)
    assert report["passed"] is False and report["checks"]["optimizers"]["lamb_foreach"]["passed"] is False


def test_results_are_strict_json(tmp_path):
    out = tmp_path / "r.json"
    gpu_check.write_json(out, {"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}, "e": torch})
    assert _strict_load(out) == {"a": "inf", "b": ["nan", 1.5], "c": {"d": "-inf"}, "e": str(torch)}


def test_benchmark_lengths_follow_the_real_shards():
    lengths = gpu_check.realistic_lengths(20000)
    assert abs(lengths.mean() / 512 - 0.526) < 0.01 and lengths.min() >= 19 and lengths.max() == 512
    assert abs(np.median(lengths) - 258) < 8


def test_synthetic_batch_is_a_valid_pretraining_batch():
    """The checks' input: masked positions inside each sequence's real length, never [CLS], sorted."""
    b = gn.synthetic_batch(gn.tiny_config(), 6, 64, "cpu", padded=True, seed=3)
    lengths = b["attention_mask"].sum(1)
    assert (lengths < 64).any() and (lengths >= 16).all()
    pos = b["masked_lm_positions"]
    assert (pos >= 1).all() and (pos < lengths[:, None]).all()
    assert (pos[:, 1:] > pos[:, :-1]).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    full = gn.synthetic_batch(gn.tiny_config(), 2, 32, "cpu", padded=False)
    assert bool(full["attention_mask"].all())


def _reference_dropout_attention(q, k, v, cu, max_seqlen, p):
    """flash_varlen_dropout's contract on CPU: per-sequence SDPA with dropout (torch's RNG: replayable by seed)."""
    b = cu.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[s:e].transpose(0, 1).float() for x in (q, k, v)), dropout_p=p).transpose(0, 1).to(q.dtype)
        for s, e in zip(b[:-1], b[1:])])


class _WrongMaskBackward(torch.autograd.Function):
    """Forward with one dropout mask, backward through a freshly drawn one: the bug the dropout check exists for."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, p):
        ctx.save_for_backward(q, k, v, cu)
        ctx.p = p
        return _reference_dropout_attention(q, k, v, cu, max_seqlen, p)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = _reference_dropout_attention(*leaves, cu, 0, ctx.p)
            return (*torch.autograd.grad(out, leaves, grad), None, None, None)


@pytest.mark.parametrize("kernel,should_pass", [("correct", True), ("wrong_mask", False)])
def test_dropout_check_catches_a_backward_with_another_mask(monkeypatch, kernel, should_pass):
    """The flash-dropout check's logic, on CPU with a reference kernel: it passes a correct one and fails one whose
    backward draws a different mask than its forward."""
    from pretraining import attention

    fn = _reference_dropout_attention if kernel == "correct" else _WrongMaskBackward.apply
    monkeypatch.setattr(attention, "flash_varlen_dropout", fn)
    result = gn.check_flash_dropout(torch.device("cpu"))
    assert result["replay_identical"] and result["other_seed_differs"]
    assert result["passed"] is should_pass, result
