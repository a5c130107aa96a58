"""Lamb vs an independent element-by-element reference of DeepSpeed FusedLamb's rule; optimizer selection; lr schedule."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pretraining import optim
from pretraining.optim import Lamb, build_optimizer, build_scheduler, optimizer_candidates


def reference_lamb_step(p, g, m, v, t, lr, b1, b2, eps, wd, max_coeff=10.0, min_coeff=0.01):
    """Plain-python transcription of fused_lamb_cuda_kernel.cu (eps mode 1, bias correction on). Lists of floats."""
    n = len(p)
    upd = [0.0] * n
    for j in range(n):
        m[j] = b1 * m[j] + (1 - b1) * g[j]
        v[j] = b2 * v[j] + (1 - b2) * g[j] * g[j]
        upd[j] = m[j] / (math.sqrt(v[j]) + eps) + wd * p[j]
    w_norm = math.sqrt(sum(x * x for x in p))
    u_norm = math.sqrt(sum(x * x for x in upd))
    coeff = 1.0
    if w_norm != 0 and u_norm != 0:
        coeff = min(max(w_norm / u_norm, min_coeff), max_coeff)
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    return [p[j] - step_size * coeff * upd[j] for j in range(n)], coeff


@pytest.mark.parametrize("wd", [0.0, 0.01, 0.5])
def test_lamb_matches_reference_over_steps(wd):
    rng = np.random.default_rng(0)
    shapes = [(4, 6), (6,), (3,)]
    init = [rng.normal(size=s) for s in shapes]
    init[2] = np.zeros(3)  # zero weight norm -> trust ratio 1
    params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in init]
    opt = Lamb(params, lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    ref_p = [x.ravel().tolist() for x in init]
    ref_m = [[0.0] * x.size for x in init]
    ref_v = [[0.0] * x.size for x in init]
    for t in range(1, 6):
        grads = [rng.normal(size=s) * (10.0 if t == 3 else 1.0) for s in shapes]
        if t == 4:
            grads[1] = np.zeros(6)  # zero gradient (update norm may be 0 for the zero-weight tensor)
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        coeffs = []
        for i, g in enumerate(grads):
            ref_p[i], c = reference_lamb_step(ref_p[i], g.ravel().tolist(), ref_m[i], ref_v[i], t, 0.01, 0.9, 0.999,
                                              1e-6, wd)
            coeffs.append(c)
        for p, r in zip(params, ref_p):
            np.testing.assert_allclose(p.detach().numpy().ravel(), r, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(opt.get_lamb_coeffs(), coeffs, rtol=1e-10)
    assert opt.get_lamb_coeffs()[2] != 1.0  # the zero tensor left zero after step 1, ratio clamps normally


def test_lamb_trust_ratio_clamped_and_zero_update():
    p = torch.nn.Parameter(torch.full((4,), 100.0))
    opt = Lamb([p], lr=0.1, weight_decay=0.0, max_coeff=10.0)
    p.grad = torch.full((4,), 1e-3)
    opt.step()
    assert opt.get_lamb_coeffs() == [10.0]  # |p|/|u| = 200/2 -> clamped to max_coeff
    q = torch.nn.Parameter(torch.ones(3))
    opt = Lamb([q], lr=0.1, weight_decay=0.0)
    q.grad = torch.zeros(3)
    opt.step()
    assert opt.get_lamb_coeffs() == [1.0] and torch.equal(q.detach(), torch.ones(3))  # zero update norm


def test_lamb_state_dict_resume_is_exact():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    oa = Lamb(a.parameters(), lr=0.01, weight_decay=0.01)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(4)]
    for gs in grads[:2]:
        for p, g in zip(a.parameters(), gs):
            p.grad = g
        oa.step()
    ob = Lamb(b.parameters(), lr=0.01, weight_decay=0.01)
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as if read back from disk
    for gs in grads[2:]:
        for model, opt in ((a, oa), (b, ob)):
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_build_optimizer_cpu_groups_and_selection(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.tie = model[0]  # same parameters reachable twice: must appear once
    opt = build_optimizer(model, "lamb", lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, device_type="cpu")
    assert type(opt) is Lamb
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # bias, LN weight, LN bias
    adamw = build_optimizer(model, "adamw", lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                            device_type="cpu")
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.99)
    assert adamw.defaults["fused"] is True  # the fused CPU kernel, not the per-tensor loop

    assert [c for c, _ in optimizer_candidates("lamb", "cuda")] == [
        "deepspeed.ops.lamb.FusedLamb", "apex.optimizers.FusedLAMB", "pretraining.optim.Lamb"]
    assert optimizer_candidates("adamw", "cuda")[0][0] == "deepspeed.ops.adam.FusedAdam"
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizer_candidates("sgd", "cpu")

    # On "cuda", a fused op that cannot load falls through to the next implementation, with a warning.
    tried = []

    class Fused(Lamb):
        pass

    def fake_load(path):
        tried.append(path)
        if path.startswith("deepspeed"):
            raise RuntimeError("op build failed")
        if path.startswith("apex"):
            raise ImportError("no apex")
        return Fused

    monkeypatch.setattr(optim, "_load", fake_load)
    assert type(build_optimizer(model, "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.01, device_type="cuda")) is Fused
    assert tried == ["deepspeed.ops.lamb.FusedLamb", "apex.optimizers.FusedLAMB", "pretraining.optim.Lamb"]


def test_build_optimizer_real_deepspeed_fused_class_on_cuda_only():
    """Without CUDA the DeepSpeed FusedLamb constructor cannot build its op; selection falls back to ours."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    try:
        import apex  # noqa: F401

        pytest.skip("apex present")
    except ImportError:
        pass
    opt = build_optimizer(torch.nn.Linear(2, 2), "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.0, device_type="cuda")
    assert type(opt) is Lamb


def lrs(schedule, power=1.0, warmup=4, total=12):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, warmup, total, schedule, power)
    out = []
    for _ in range(total + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_scheduler_exact_values():
    lin = lrs("linear")
    assert lin[:4] == [0.5, 1.0, 1.5, 2.0]  # warmup (step+1)/4 * 2.0
    assert lin[4] == 2.0 and lin[8] == pytest.approx(1.0) and lin[11] == pytest.approx(0.25)
    assert lin[12] == 0.0 and lin[13] == 0.0
    poly = lrs("poly", power=0.5)
    assert poly[:4] == lin[:4]
    assert poly[8] == pytest.approx(2.0 * 0.5**0.5) and poly[10] == pytest.approx(2.0 * 0.25**0.5)
    assert lrs("linear", warmup=0)[0] == 2.0
    with pytest.raises(ValueError, match="warmup_steps"):
        lrs("linear", warmup=20)
    with pytest.raises(ValueError, match="cosine"):
        lrs("cosine")
