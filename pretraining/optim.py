"""Optimizers (LAMB, AdamW), the precision plan that decides who owns mixed precision, and the LR schedule.

Training uses the multi-tensor optimizers of pretraining.optim_foreach (no extension build; DeepSpeed's fused ops only
when they were built at install time). `plan_precision` turns a DeepSpeed config into what deepspeed.initialize gets:
at ZeRO stage 0 the parameters stay fp32 (master weights), the forward runs under torch.autocast(bf16/fp16) and our
step does clipping and fp16 loss scaling (DeepSpeed's fp16/bf16 sections and gradient_clipping are taken out of its
config, so it wraps nothing); at ZeRO >= 1 DeepSpeed's ZeRO optimizer keeps precision, clipping and partitioning and
calls our step on its fp32 partitions.

`Lamb` below is the per-tensor reference the multi-tensor LAMB is tested against: a pure-PyTorch copy of DeepSpeed FusedLamb's update rule (deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu),
so CPU runs and CUDA runs train the same way. Per parameter tensor, at step t:
    m = b1*m + (1-b1)*g                      v = b2*v + (1-b2)*g^2          (no bias correction of m, v themselves)
    u = m / (sqrt(v) + eps) + wd * p         (eps outside the sqrt, on the *uncorrected* v; decay inside the update)
    ratio = clamp(|p| / |u|, min_coeff, max_coeff), or 1 when |p| == 0 or |u| == 0
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * ratio * u     (bias correction folded into the step size)
The trust ratio applies to every tensor, biases and LayerNorm included, as in FusedLamb.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from pretraining.optim_foreach import DynamicLossScaler, ForeachAdamW, ForeachLamb, load_deepspeed_op  # noqa: F401

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


_LAMB, _ADAMW = "pretraining.optim_foreach.ForeachLamb", "pretraining.optim_foreach.ForeachAdamW"
# Fastest first: (class path, kernel). A "deepspeed" kernel is only there when DeepSpeed was installed with its ops
# built (DS_BUILD_FUSED_LAMB=1 / DS_BUILD_FUSED_ADAM=1); it is never JIT-compiled from here.
_CANDIDATES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("lamb", "cuda"): [(_LAMB, "deepspeed"), (_LAMB, "foreach")],
    ("lamb", "cpu"): [(_LAMB, "foreach")],
    ("adamw", "cuda"): [(_ADAMW, "deepspeed"), (_ADAMW, "torch_fused"), (_ADAMW, "foreach")],
    ("adamw", "cpu"): [(_ADAMW, "torch_fused"), (_ADAMW, "foreach")],  # torch's fused CPU AdamW: several x foreach
}


def optimizer_candidates(name: str, device_type: str) -> list[tuple[str, str]]:
    """Implementations to try, in order, for `name` on `device_type` (any non-CUDA device uses the CPU list)."""
    if name not in ("lamb", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}: expected 'lamb' or 'adamw'")
    return _CANDIDATES[(name, "cuda" if device_type == "cuda" else "cpu")]


@dataclass
class PrecisionPlan:
    """Who does mixed precision, and the DeepSpeed config that follows from it (see the module docstring)."""

    precision: str  # fp32 | bf16 | fp16 (what the DeepSpeed config asked for)
    owner: str  # "ours" (ZeRO 0: fp32 params + autocast, our step clips/scales) | "deepspeed" (ZeRO >= 1)
    ds_config: dict  # what deepspeed.initialize gets
    max_grad_norm: float = 0.0  # clipping done by our step (0 when DeepSpeed clips)
    loss_scaler: DynamicLossScaler | None = None  # fp16 under "ours"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.owner != "ours":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self, device_type: str):
        """The forward's context: torch.autocast to the run's precision under "ours", a no-op otherwise."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scaler.scale if self.loss_scaler is not None else loss

    def describe(self) -> str:
        if self.owner == "ours":
            how = f"{self.precision} autocast" if self.precision != "fp32" else "fp32"
            scale = ", dynamic loss scaling" if self.loss_scaler is not None else ""
            return f"fp32 master weights, {how}{scale}, clip {self.max_grad_norm:g} in the optimizer step"
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        return f"DeepSpeed ZeRO-{stage} {self.precision} (its partitions, clipping and loss scaling)"


def plan_precision(ds_config: dict) -> PrecisionPlan:
    ds = json.loads(json.dumps(ds_config))
    precision = ("fp16" if ds.get("fp16", {}).get("enabled") else
                 "bf16" if ds.get("bf16", {}).get("enabled") else "fp32")
    # DeepSpeed's throughput timer calls cuda synchronize at every forward and every step (timers.throughput
    # .synchronized defaults to true); we measure time ourselves.
    ds.setdefault("timers", {})["throughput"] = {"enabled": False}
    if int(ds.get("zero_optimization", {}).get("stage", 0)) > 0:
        return PrecisionPlan(precision, "deepspeed", ds)
    fp16 = ds.pop("fp16", {})
    ds.pop("bf16", None)
    clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    ds["gradient_clipping"] = 0.0
    scaler = DynamicLossScaler.from_deepspeed(fp16) if precision == "fp16" else None
    return PrecisionPlan(precision, "ours", ds, max_grad_norm=clip, loss_scaler=scaler)


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                    weight_decay: float = 0.01, device_type: str = "cpu",
                    plan: PrecisionPlan | None = None, fresh=frozenset()) -> torch.optim.Optimizer:
    """The fastest available implementation (`.implementation` names it). `plan`: clipping and loss scaling go into
    the step when we own precision (ZeRO 0); without a plan the step only updates (and tracks the gradient norm).
    `fresh`: names of freshly initialised parameters, given groups of their own (param_groups) for a head warm-up."""
    ours = plan is not None and plan.owner == "ours"
    extra = dict(max_grad_norm=plan.max_grad_norm, loss_scaler=plan.loss_scaler) if ours else {}
    if plan is not None and not ours:
        extra["track_norm"] = False
    failures = []
    for path, kernel in optimizer_candidates(name, device_type):
        try:  # fresh groups each try: optimizers write their defaults into the group dicts they are given
            optimizer = _load(path)(param_groups(model, weight_decay, fresh), lr=lr, betas=tuple(betas), eps=eps,
                                    weight_decay=weight_decay, kernel=kernel, **extra)
        except Exception as e:  # a DeepSpeed op not built at install time, a torch without the fused kernel
            failures.append(f"{path}[{kernel}]: {type(e).__name__}: {e}")
            continue
        if failures:
            log.info("optimizer %s: using %s; not available: %s", name, optimizer.implementation, "; ".join(failures))
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
