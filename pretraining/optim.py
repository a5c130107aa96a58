"""Optimizers (LAMB, AdamW) and the warmup + decay learning-rate schedule.

`Lamb` is a pure-PyTorch copy of DeepSpeed FusedLamb's update rule (deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu),
so CPU runs and CUDA runs train the same way. Per parameter tensor, at step t:
    m = b1*m + (1-b1)*g                      v = b2*v + (1-b2)*g^2          (no bias correction of m, v themselves)
    u = m / (sqrt(v) + eps) + wd * p         (eps outside the sqrt, on the *uncorrected* v; decay inside the update)
    ratio = clamp(|p| / |u|, min_coeff, max_coeff), or 1 when |p| == 0 or |u| == 0
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * ratio * u     (bias correction folded into the step size)
The trust ratio applies to every tensor, biases and LayerNorm included, as in FusedLamb.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                 max_coeff=10.0, min_coeff=0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Lamb hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.lamb_coeffs: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lamb_coeffs = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype  # math in >= fp32
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                step = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                grad, weight = p.grad.to(dtype), p.to(dtype)

                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(weight, alpha=group["weight_decay"])

                w_norm, u_norm = weight.norm(), update.norm()
                ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                    (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]),
                                    torch.ones_like(w_norm))
                step_size = group["lr"]
                if group["bias_correction"]:
                    step_size *= math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.copy_(weight - step_size * ratio * update)
                self.lamb_coeffs.append(ratio)
        return loss

    def get_lamb_coeffs(self) -> list[float]:
        """Trust ratios of the last step (same accessor as FusedLamb); host sync, call for logging only."""
        return [float(r) for r in self.lamb_coeffs]


def param_groups(model: torch.nn.Module, weight_decay: float, fresh: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (every tensor with ndim < 2) get none.

    ``fresh`` names parameters that were freshly initialised (heads the start checkpoint lacked). They get groups of
    their own, after the others and tagged ``fresh: True``, so that the scheduler can hold the loaded weights still
    while the fresh heads warm up (build_scheduler's head_warmup_steps)."""
    groups = {}
    for name, p in model.named_parameters():  # deduplicated: a tied Parameter appears once, under its first name
        if p.requires_grad:
            key = (name in fresh, p.ndim < 2)
            groups.setdefault(key, []).append(p)
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay, "fresh": key[0]}
            for key in sorted(groups)]


def _load(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Fastest first. Each entry: (class path, extra constructor kwargs). apex's defaults differ from DeepSpeed's (global
# grad-norm clipping inside FusedLAMB), so clipping is switched off there: the engine clips.
_CANDIDATES: dict[tuple[str, str], list[tuple[str, dict]]] = {
    ("lamb", "cuda"): [("deepspeed.ops.lamb.FusedLamb", {}),
                       ("apex.optimizers.FusedLAMB", {"max_grad_norm": 0.0, "adam_w_mode": True}),
                       ("pretraining.optim.Lamb", {})],
    ("lamb", "cpu"): [("pretraining.optim.Lamb", {})],
    ("adamw", "cuda"): [("deepspeed.ops.adam.FusedAdam", {"adam_w_mode": True}),
                        ("apex.optimizers.FusedAdam", {"adam_w_mode": True}),
                        ("torch.optim.AdamW", {"fused": True})],
    # torch's fused CPU AdamW: ~6x faster than the foreach path on MiniLM (docs/benchmarks.md)
    ("adamw", "cpu"): [("torch.optim.AdamW", {"fused": True}), ("torch.optim.AdamW", {})],
}


def optimizer_candidates(name: str, device_type: str) -> list[tuple[str, dict]]:
    """Implementations to try, in order, for `name` on `device_type` (any non-CUDA device uses the CPU list)."""
    if name not in ("lamb", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}: expected 'lamb' or 'adamw'")
    return _CANDIDATES[(name, "cuda" if device_type == "cuda" else "cpu")]


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                    weight_decay: float = 0.01, device_type: str = "cpu", fresh=frozenset()) -> torch.optim.Optimizer:
    """The fastest available implementation; falls back (with a warning) when a fused kernel cannot be loaded."""
    failures = []
    for path, extra in optimizer_candidates(name, device_type):
        try:  # fresh groups each try: torch optimizers write their defaults into the group dicts they are given
            optimizer = _load(path)(param_groups(model, weight_decay, fresh), lr=lr, betas=tuple(betas), eps=eps,
                                    weight_decay=weight_decay, **extra)
        except Exception as e:  # ImportError, or a CUDA op that fails to build/load
            failures.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if failures:
            log.warning("optimizer %s: using %s; unavailable: %s", name, path, "; ".join(failures))
        return optimizer
    raise RuntimeError(f"no {name} implementation could be built: " + "; ".join(failures))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear", power: float = 1.0) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first step already learns and step warmup_steps - 1 reaches the peak.
    Decay: ((total - step) / (total - warmup)) ** power, 1 at the end of warmup, 0 at total_steps and after.
    "linear" is power 1; "poly" uses `power` (NVIDIA's BERT recipe uses 0.5).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    remaining = (total_steps - step) / (total_steps - warmup_steps)
    return remaining if schedule == "linear" else remaining**power


def head_warmup_multipliers(step: int, head_warmup_steps: int, warmup_steps: int, total_steps: int,
                            schedule: str = "linear", power: float = 1.0) -> tuple[float, float]:
    """(loaded weights, fresh heads) lr factors for optimizer step `step` (0-based) with a head warm-up.

    Steps [0, H): the loaded weights stand still (factor 0) while the fresh heads learn at the peak lr (after their own
    ramp of min(warmup, H) steps). From step H the usual warmup + decay runs over [H, total) for the loaded weights;
    the heads skip the re-ramp and follow the decay, so they never drop back to a tiny lr.
    """
    H = head_warmup_steps
    if H <= 0:
        return (lr_multiplier(step, warmup_steps, total_steps, schedule, power),) * 2
    if step < H:
        return 0.0, min(1.0, (step + 1) / max(1, min(warmup_steps, H)))
    loaded = lr_multiplier(step - H, warmup_steps, total_steps - H, schedule, power)
    return loaded, lr_multiplier(max(step - H, warmup_steps), warmup_steps, total_steps - H, schedule, power)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str = "linear",
                    power: float = 1.0, head_warmup_steps: int = 0) -> LambdaLR:
    """Warmup + decay on every group; with ``head_warmup_steps`` > 0 a per-group factor (head_warmup_multipliers) on
    the groups param_groups tagged ``fresh``. A factor of 0 leaves a parameter bit-identical in AdamW (the decay is
    multiplied by lr) and LAMB (the step size is), and works under any ZeRO stage, which keeps the groups' lr."""
    if schedule not in ("linear", "poly"):
        raise ValueError(f"unknown lr schedule {schedule!r}: expected 'linear' or 'poly'")
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps > 0")
    if power <= 0:
        raise ValueError(f"poly power must be > 0, got {power}")
    if head_warmup_steps <= 0:
        return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule, power))
    if head_warmup_steps + warmup_steps >= total_steps:
        raise ValueError(f"head warm-up ({head_warmup_steps} steps) + warmup ({warmup_steps}) must be < total_steps "
                         f"({total_steps}): nothing would be left to train the whole model")
    if not any(g.get("fresh") for g in optimizer.param_groups):
        raise ValueError("a head warm-up needs fresh parameter groups (param_groups(..., fresh=names))")

    def factor(fresh: bool):
        return lambda step: head_warmup_multipliers(step, head_warmup_steps, warmup_steps, total_steps, schedule,
                                                    power)[int(fresh)]

    return LambdaLR(optimizer, [factor(bool(g.get("fresh"))) for g in optimizer.param_groups])
