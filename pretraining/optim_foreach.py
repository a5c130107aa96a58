"""Multi-tensor LAMB and AdamW on fp32 parameters: global-norm clipping and fp16 dynamic loss scaling built in, no
extension build, no host sync in a bf16/fp32 step.

Why not DeepSpeed's precision wrapper: at ZeRO stage 0, DeepSpeed wraps a bf16/fp16 client optimizer in
FP16_UnfusedOptimizer (an overflow check per parameter tensor, each a host sync, and per-tensor kernels), and its
FusedLamb/FusedAdam are JIT-compiled with nvcc on first use. Here the parameters stay fp32 -- they are the master
weights; the forward runs under torch.autocast, so gradients arrive and accumulate in fp32 -- and one step is:
  1. the total norm of all gradients (torch._foreach_norm; one value, left on the device)
  2. fp16 only: that value is read once -> non-finite: skip the step and lower the scale (DeepSpeed's dynamic scaler
     rules: scale window, hysteresis, min scale); the one host sync of an fp16 step
  3. grads *= min(1, max_norm / (norm + 1e-6)) / loss_scale (one multi-tensor multiply; the factor stays on device)
  4. the update, multi-tensor, per parameter group:
       LAMB   DeepSpeed FusedLamb's arithmetic (pretraining.optim.Lamb spells it out), trust ratio per tensor
       AdamW  decoupled weight decay, bias-corrected (torch.optim.AdamW's arithmetic)
     kernels: "foreach" (torch._foreach_* ops; always there), "torch_fused" (AdamW: torch._fused_adamw_, CUDA and
     CPU), "deepspeed" (DeepSpeed's fused_lamb / fused_adam ops, only when built at install time: never compiled here).
`self.overflow` and `self._global_grad_norm` are what DeepSpeed's engine reads after step(): a skipped step is counted
in engine.skipped_steps and does not advance the LR scheduler. Step counts are Python ints (per tensor, as in
FusedLamb), so step sizes are computed on the host without reading the device.
"""

from __future__ import annotations

import math

import torch


class DynamicLossScaler:
    """DeepSpeed's fp16 dynamic loss scaling (deepspeed/runtime/fp16/loss_scaler.py), same rules and defaults."""

    def __init__(self, init_scale: float = 2.0**16, scale_window: int = 1000, min_scale: float = 1.0,
                 hysteresis: int = 2, consecutive_hysteresis: bool = False, static: bool = False):
        self.scale, self.scale_window, self.min_scale = float(init_scale), scale_window, float(min_scale)
        self.hysteresis = self.cur_hysteresis = hysteresis
        self.consecutive_hysteresis, self.static = consecutive_hysteresis, static
        self.cur_iter, self.last_overflow_iter = 0, -1

    @classmethod
    def from_deepspeed(cls, fp16: dict) -> DynamicLossScaler:
        """From a DeepSpeed config's fp16 section (loss_scale 0 = dynamic, > 0 = static)."""
        static = float(fp16.get("loss_scale", 0) or 0)
        if static > 0:
            return cls(init_scale=static, static=True)
        return cls(init_scale=2.0 ** fp16.get("initial_scale_power", 16), scale_window=fp16.get("loss_scale_window",
                   1000), min_scale=fp16.get("min_loss_scale", 1), hysteresis=fp16.get("hysteresis", 2),
                   consecutive_hysteresis=fp16.get("consecutive_hysteresis", False))

    def update(self, overflow: bool) -> None:
        if self.static:
            return
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.scale *= 2
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return dict(scale=self.scale, cur_hysteresis=self.cur_hysteresis, cur_iter=self.cur_iter,
                    last_overflow_iter=self.last_overflow_iter)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, fp32, on their device (no read-back)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))


def load_deepspeed_op(name: str):
    """DeepSpeed's fused_lamb / fused_adam extension if it was built when DeepSpeed was installed, else None.
    A JIT build (minutes, needs nvcc and CUDA_HOME) is never started from here."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import FusedAdamBuilder, FusedLambBuilder
    except ImportError:
        return None
    if not installed_ops.get(name, False) or not torch.cuda.is_available():
        return None
    builder = {"fused_lamb": FusedLambBuilder, "fused_adam": FusedAdamBuilder}[name]()
    try:
        return builder.load(verbose=False)
    except Exception:  # noqa: BLE001 - prebuilt for another CUDA/torch: the torch kernels do the same work
        return None


class MultiTensorOptimizer(torch.optim.Optimizer):
    """Shared step: collect grads, one norm, optional overflow skip, one clip/unscale multiply, `_update` per group."""

    kernels: tuple[str, ...] = ("foreach",)

    def __init__(self, params, defaults: dict, max_grad_norm: float = 0.0,
                 loss_scaler: DynamicLossScaler | None = None, kernel: str = "foreach", track_norm: bool = True):
        if kernel not in self.kernels:
            raise ValueError(f"{type(self).__name__}: kernel {kernel!r} not in {self.kernels}")
        super().__init__(params, defaults)
        self.max_grad_norm, self.loss_scaler, self.kernel = float(max_grad_norm), loss_scaler, kernel
        self.track_norm = track_norm  # False under ZeRO: its partitions' norms mean nothing, ZeRO reports its own
        self._ds_op = None
        if kernel == "deepspeed":
            self._ds_op = load_deepspeed_op(self.deepspeed_op)
            if self._ds_op is None:
                raise RuntimeError(f"DeepSpeed's {self.deepspeed_op} op was not built at install time")
        self.overflow = False
        self._global_grad_norm = None

    deepspeed_op = ""

    @property
    def implementation(self) -> str:
        return f"{type(self).__name__}[{self.kernel}]"

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.dtype in (torch.float16, torch.bfloat16):
                    raise TypeError(f"{type(self).__name__} keeps fp32 master weights in the parameters themselves; "
                                    f"got a {p.dtype} parameter (run the forward under torch.autocast instead)")
            groups.append((group, params, [p.grad for p in params]))
        grads = [g for _, _, gs in groups for g in gs]
        self.overflow = False
        scale = self.loss_scale
        norm = None
        if grads and (self.track_norm or self.max_grad_norm > 0 or self.loss_scaler is not None):
            norm = global_norm(grads)
            if self.loss_scaler is not None:
                self.overflow = not bool(torch.isfinite(norm))  # the one host sync of an fp16 step
                self.loss_scaler.update(self.overflow)
                if self.overflow:
                    self._global_grad_norm = norm
                    return loss
            if scale != 1.0:
                norm = norm / scale
            factor = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if self.max_grad_norm > 0 else None
            if scale != 1.0:
                factor = 1.0 / scale if factor is None else factor / scale
            if factor is not None:
                torch._foreach_mul_(grads, factor)
        self._global_grad_norm = norm
        for group, params, group_grads in groups:
            if params:
                self._update(group, params, group_grads)
        return loss

    def _update(self, group: dict, params: list, grads: list) -> None:
        raise NotImplementedError

    def _states(self, params: list) -> tuple[list, list, list[int]]:
        """exp_avg, exp_avg_sq (fp32, created at first use) and the incremented per-tensor step counts."""
        m, v, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1  # an int: tensors from older checkpoints are converted once
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return m, v, steps

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)
        if scaler is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler)


class ForeachLamb(MultiTensorOptimizer):
    """LAMB with FusedLamb's update (see module docstring); defaults as DeepSpeed's FusedLamb."""

    kernels = ("foreach", "deepspeed")
    deepspeed_op = "fused_lamb"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                 max_coeff=10.0, min_coeff=0.01, max_grad_norm=0.0, loss_scaler=None, kernel="foreach",
                 track_norm=True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults, max_grad_norm, loss_scaler, kernel, track_norm)
        self.lamb_coeffs: list[torch.Tensor] = []

    def step(self, closure=None):
        self.lamb_coeffs = []
        return super().step(closure)

    def _step_sizes(self, group: dict, steps: list[int]) -> list[float]:
        b1, b2 = group["betas"]
        if not group["bias_correction"]:
            return [group["lr"]] * len(steps)
        return [group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) for t in steps]

    def _update(self, group, params, grads):
        b1, b2 = group["betas"]
        m, v, steps = self._states(params)
        step_sizes = self._step_sizes(group, steps)
        if self.kernel == "deepspeed":
            empty = torch.tensor([], dtype=torch.float)
            for p, g, m_, v_, t in zip(params, grads, m, v, steps):
                self.lamb_coeffs.append(self._ds_op.lamb(
                    p, empty, m_, v_, g, group["lr"], b1, b2, group["max_coeff"], group["min_coeff"], group["eps"],
                    1.0, t, 1, int(group["bias_correction"]), group["weight_decay"]))
            return
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["eps"])  # eps outside the sqrt, on the uncorrected v (FusedLamb eps_mode 1)
        update = torch._foreach_div(m, denom)
        del denom
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(update))
        ratio = torch.where((w_norm > 0) & (u_norm > 0),
                            (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]), torch.ones_like(w_norm))
        self.lamb_coeffs.extend(ratio.unbind(0))
        torch._foreach_mul_(update, list(ratio.unbind(0)))
        torch._foreach_mul_(update, [-s for s in step_sizes])
        torch._foreach_add_(params, update)

    def get_lamb_coeffs(self) -> list[float]:
        """Trust ratios of the last step (FusedLamb's accessor); reads the device: for logging only."""
        return [float(r) for r in self.lamb_coeffs]


class ForeachAdamW(MultiTensorOptimizer):
    """AdamW (decoupled weight decay, bias correction) with torch.optim.AdamW's arithmetic."""

    kernels = ("foreach", "torch_fused", "deepspeed")
    deepspeed_op = "fused_adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, max_grad_norm=0.0,
                 loss_scaler=None, kernel="foreach", track_norm=True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         max_grad_norm, loss_scaler, kernel, track_norm)
        if kernel == "torch_fused" and not hasattr(torch, "_fused_adamw_"):
            raise RuntimeError("this torch has no fused AdamW kernel")
        self._device_steps: dict[torch.Tensor, torch.Tensor] = {}  # torch_fused: the step counts, on the device

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._device_steps = {}

    def _update(self, group, params, grads):
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        m, v, steps = self._states(params)
        if self.kernel == "torch_fused":
            device_steps = []
            for p, t in zip(params, steps):
                if p not in self._device_steps:  # once (and after a resume): the increments below stay on device
                    self._device_steps[p] = torch.full((), t - 1, dtype=torch.float32, device=p.device)
                device_steps.append(self._device_steps[p])
            torch._foreach_add_(device_steps, 1)
            torch._fused_adamw_(params, grads, m, v, [], device_steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False)
            return
        if self.kernel == "deepspeed":
            from deepspeed.ops.adam.multi_tensor_apply import MultiTensorApply

            flag = torch.zeros(1, dtype=torch.int, device=params[0].device)
            for t in sorted(set(steps)):  # one launch per distinct step count (normally one)
                idx = [i for i, s in enumerate(steps) if s == t]
                MultiTensorApply(2048 * 32)(self._ds_op.multi_tensor_adam, flag,
                                            [[x[i] for i in idx] for x in (grads, params, m, v)],
                                            lr, b1, b2, eps, t, 1, 1, wd)
            return
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - b2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - b1**t) for t in steps])
