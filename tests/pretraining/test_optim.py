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


def _twin_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    init[2].zero_()  # a zero tensor: trust ratio 1 at the first step
    return ([torch.nn.Parameter(x.clone()) for x in init], [torch.nn.Parameter(x.clone()) for x in init])


def _groups(params, wd):
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_foreach_lamb_equals_reference_lamb(wd):
    """The multi-tensor LAMB (what trains) == the per-tensor Lamb (tested above against FusedLamb's kernel), with a
    zero tensor, a zero gradient and a decay / no-decay split: per-tensor trust ratios, not one per group."""
    shapes = [(6, 5), (5, 3), (5,), (3,)]
    ours, ref = _twin_params(shapes, torch.float64)
    a = optim.ForeachLamb(_groups(ours, wd), lr=0.01, eps=1e-6)
    b = Lamb(_groups(ref, wd), lr=0.01, eps=1e-6)
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * (30.0 if t == 2 else 1.0) for s in shapes]
        if t == 3:
            grads[1].zero_()
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step()
        b.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        # a.lamb_coeffs are in group order (decay first), as b's
        np.testing.assert_allclose(a.get_lamb_coeffs(), b.get_lamb_coeffs(), rtol=1e-12)
    assert len(set(np.round(a.get_lamb_coeffs(), 6))) > 2  # distinct per-tensor ratios
    assert a.implementation == "ForeachLamb[foreach]"


@pytest.mark.parametrize("kernel", ["foreach", "torch_fused"])
def test_foreach_adamw_equals_torch_adamw(kernel):
    shapes = [(6, 5), (5, 3), (5,), (3,)]
    ours, ref = _twin_params(shapes, torch.float32)
    a = optim.ForeachAdamW(_groups(ours, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, kernel=kernel)
    b = torch.optim.AdamW(_groups(ref, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clipping_and_fp16_loss_scaling_in_the_step():
    """grads arrive multiplied by the loss scale S: the step unscales and clips in one multiply (== clip_grad_norm_ +
    torch AdamW on the true gradients); an inf skips the step, leaves weights and moments alone, lowers S after the
    hysteresis; the state (moments, step counts, scaler) survives a state_dict round trip."""
    shapes = [(6, 5), (5, 3), (5,), (3,)]
    ours, ref = _twin_params(shapes, torch.float32)
    scaler = optim.DynamicLossScaler(init_scale=2.0**10, scale_window=1000, hysteresis=2)
    a = optim.ForeachAdamW(_groups(ours, 0.01), lr=1e-2, max_grad_norm=0.5, loss_scaler=scaler)
    b = torch.optim.AdamW(_groups(ref, 0.01), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for t in range(6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        S = scaler.scale
        for p, gr in zip(ours, grads):
            p.grad = gr * S
        if t in (2, 3):
            ours[0].grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in ours]
        a.step()
        if t in (2, 3):
            assert a.overflow and all(torch.equal(x, p) for x, p in zip(before, ours))
            continue
        assert not a.overflow
        for q, gr in zip(ref, grads):
            q.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        torch.testing.assert_close(a._global_grad_norm, norm, rtol=1e-6, atol=0)
        b.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert scaler.scale == 2.0**9  # first overflow used up the hysteresis, the second halved the scale
    state = copy.deepcopy(a.state_dict())
    c = optim.ForeachAdamW(_groups([torch.nn.Parameter(p.detach().clone()) for p in ours], 0.01), lr=1e-2,
                           max_grad_norm=0.5, loss_scaler=optim.DynamicLossScaler())
    c.load_state_dict(state)
    assert c.loss_scaler.scale == 2.0**9 and c.state_dict()["state"][0]["step"] == 4


def test_loss_scaler_follows_deepspeed_rules(monkeypatch):
    """Same decisions as DeepSpeed's DynamicLossScaler over an overflow pattern (window 3, hysteresis 2)."""
    from deepspeed.runtime.fp16 import loss_scaler as ds_scaler

    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 1)  # its logging asks; no process group here
    ours = optim.DynamicLossScaler(init_scale=2.0**8, scale_window=3, min_scale=1, hysteresis=2)
    ref = ds_scaler.DynamicLossScaler(init_scale=2.0**8, scale_window=3, min_scale=1, delayed_shift=2,
                                      consecutive_hysteresis=False)
    pattern = [0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    for overflow in pattern:
        ours.update(bool(overflow))
        ref.update_scale(bool(overflow))
        assert ours.scale == ref.cur_scale
    assert optim.DynamicLossScaler.from_deepspeed({"loss_scale": 128}).static
    assert optim.DynamicLossScaler.from_deepspeed({"initial_scale_power": 12}).scale == 4096


def test_build_optimizer_selection_and_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.tie = model[0]  # same parameters reachable twice: must appear once
    opt = build_optimizer(model, "lamb", lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, device_type="cpu")
    assert opt.implementation == "ForeachLamb[foreach]"
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # bias, LN weight, LN bias
    adamw = build_optimizer(model, "adamw", lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                            device_type="cpu")
    assert adamw.implementation == "ForeachAdamW[torch_fused]" and adamw.defaults["betas"] == (0.9, 0.99)
    assert [k for _, k in optimizer_candidates("lamb", "cuda")] == ["deepspeed", "foreach"]
    assert [k for _, k in optimizer_candidates("adamw", "cuda")] == ["deepspeed", "torch_fused", "foreach"]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizer_candidates("sgd", "cpu")
    # DeepSpeed's ops were not built at install time here (and there is no CUDA): never compiled, the next one runs
    assert optim.load_deepspeed_op("fused_lamb") is None
    cuda = build_optimizer(model, "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.01, device_type="cuda")
    assert cuda.implementation == "ForeachLamb[foreach]"
    with pytest.raises(TypeError, match="fp32 master weights"):
        half = torch.nn.Linear(2, 2).to(torch.bfloat16)
        half.weight.grad = torch.ones_like(half.weight)
        optim.ForeachLamb(half.parameters()).step()


def test_precision_plan():
    ds = {"train_batch_size": 8, "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 0}, "communication_data_type": "fp32"}
    plan = optim.plan_precision(ds)
    assert (plan.owner, plan.precision, plan.autocast_dtype, plan.max_grad_norm) == ("ours", "bf16", torch.bfloat16, 1.0)
    assert "bf16" not in plan.ds_config and plan.ds_config["gradient_clipping"] == 0.0  # DeepSpeed wraps nothing
    assert plan.ds_config["timers"] == {"throughput": {"enabled": False}}  # its timer synchronizes the device
    assert ds["bf16"] == {"enabled": True}  # the caller's config is left alone
    fp16 = optim.plan_precision({**ds, "bf16": {"enabled": False}, "fp16": {"enabled": True,
                                                                            "initial_scale_power": 12}})
    assert fp16.loss_scaler.scale == 4096 and fp16.scale_loss(torch.tensor(2.0)) == 8192
    zero = optim.plan_precision({**ds, "zero_optimization": {"stage": 2}})
    assert zero.owner == "deepspeed" and zero.ds_config["bf16"] == {"enabled": True} and zero.autocast_dtype is None
    assert zero.ds_config["gradient_clipping"] == 1.0
    opt = build_optimizer(torch.nn.Linear(2, 2), "adamw", 1e-3, plan=zero)
    assert opt.max_grad_norm == 0 and opt.loss_scaler is None and not opt.track_norm


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
