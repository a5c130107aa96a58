"""The DeepSpeed side of a run, typed: what a DeepSpeed JSON says, read into config sections, and the DeepSpeed dict
written back from them.

A recipe's DeepSpeed JSON (a path, or a name from the packaged ``ds_configs/``) is *read*, not passed through: its
batch, precision, ZeRO, clipping, optimizer and scheduler settings become typed run-config values (``batch``,
``engine``, ``optimizer``, ``schedule``), checked like any other; keys we do not model (bucket sizes, offload,
activation checkpointing...) are kept verbatim in ``engine.extra``. The dict DeepSpeed finally gets is generated from
the typed config for the actual world size (:func:`deepspeed_dict`), so what ``--print-config`` shows is what runs.
``"auto"`` values are resolved the way HF's Trainer resolves them: batch and clipping from the typed config, ZeRO
bucket sizes from the model's hidden size.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from biobert.config import check_choices, deep_merge, option

log = logging.getLogger(__name__)

# DeepSpeed's top-level keys (0.19): a near miss of one of these is a typo; anything else is passed on with a warning.
DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 amp
torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor communication_data_type
seq_parallel_communication_data_type sparse_gradients zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer activation_checkpointing aio flops_profiler tensorboard wandb csv_monitor comet
comms_logger steps_per_print wall_clock_breakdown dump_state memory_breakdown checkpoint data_types elasticity
autotuning curriculum_learning data_efficiency compression_training sparse_attention pipeline progressive_layer_drop
eigenvalue quantize_training dataloader_drop_last use_data_before_expert_parallelism disable_allgather nebula timers
tensor_parallel weight_quantization hybrid_engine compile graph_harvesting use_node_local_storage
""".split())
# Set by us on every generated config; a recipe may carry them but they are not settings.
_HOUSEKEEPING = {"steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True}
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class EngineConfig:
    """What DeepSpeed does around the model: precision, ZeRO, clipping (generated into the DeepSpeed dict)."""

    precision: str = option("fp32", "fp32, bf16 (no loss scaling) or fp16 (dynamic loss scaling)", choices=PRECISIONS)
    zero_stage: int = option(0, "ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), "
                                "3 (+ parameters) partitioned across ranks", choices=(0, 1, 2, 3))
    gradient_clipping: float = option(1.0, "clip the global gradient norm to this (0: off)")
    communication_data_type: str | None = option(None, "dtype of the gradient all-reduce (fp32 keeps bf16 runs' "
                                                       "gradient sums exact; default: the training precision)",
                                                 choices=("fp32", "fp16", "bf16"))
    fp16_initial_scale_power: int = option(16, "fp16: the first loss scale is 2**this")
    fp16_loss_scale_window: int = option(1000, "fp16: overflow-free steps before the loss scale doubles")
    fp16_hysteresis: int = option(2, "fp16: overflows tolerated before the scale is lowered")
    fp16_min_loss_scale: float = option(1.0, "fp16: the loss scale never goes below this")
    extra: dict = option(factory=dict, help="other DeepSpeed settings, verbatim (e.g. {zero_optimization: "
                                            "{overlap_comm: true}}); merged into the generated dict last")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.gradient_clipping < 0:
            raise ValueError(f"engine.gradient_clipping must be >= 0, got {self.gradient_clipping}")


def packaged_ds_configs() -> Path:
    import ds_configs

    return Path(ds_configs.__file__).parent


def resolve_ds_config(spec: str | Path) -> Path:
    """A DeepSpeed JSON: an existing path (relative to the working directory), else a packaged recipe by name
    (``bert_base_seq512_lamb_bf16``, with or without ``ds_configs/`` and ``.json``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = Path(str(spec).removeprefix("ds_configs/")).name
    packaged = packaged_ds_configs() / (name if name.endswith(".json") else f"{name}.json")
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in packaged_ds_configs().glob("*.json"))
    close = difflib.get_close_matches(Path(name).stem, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"packaged ones: {', '.join(known)}"
    raise FileNotFoundError(f"DeepSpeed config {str(spec)!r}: no such file, and not a packaged recipe; {hint}")


def check_keys(ds: dict, source: str) -> None:
    for key in ds:
        if key in DEEPSPEED_KEYS:
            continue
        close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1, cutoff=0.8)
        if close:
            raise ValueError(f"{source}: unknown DeepSpeed key {key!r}; did you mean {close[0]!r}?")
        log.warning("%s: DeepSpeed key %r is not one we know; passed to DeepSpeed as is", source, key)


def _auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def read_deepspeed(ds: dict, source: str) -> dict:
    """A DeepSpeed JSON -> run-config sections {batch, engine, optimizer, schedule} (DeepSpeed's own schema in;
    "auto" = leave it to the typed config)."""
    check_keys(ds, source)
    ds = {k: v for k, v in ds.items() if k not in _HOUSEKEEPING}
    out: dict[str, dict] = {"batch": {}, "engine": {}}
    for key, target in (("train_batch_size", "global_batch_size"), ("train_micro_batch_size_per_gpu",
                                                                    "micro_batch_size"),
                        ("gradient_accumulation_steps", "grad_accum_steps")):
        value = ds.pop(key, None)
        if value is not None and not _auto(value):
            out["batch"][target] = value
    fp16, bf16 = ds.pop("fp16", {}) or {}, ds.pop("bf16", {}) or {}
    if fp16.get("enabled") is True and bf16.get("enabled") is True:
        raise ValueError(f"{source}: fp16 and bf16 are both enabled: choose one")
    if bf16.get("enabled") is True:
        out["engine"]["precision"] = "bf16"
    elif fp16.get("enabled") is True:
        out["engine"]["precision"] = "fp16"
        if fp16.get("loss_scale", 0) not in (0, None):
            raise ValueError(f"{source}: fp16.loss_scale {fp16['loss_scale']}: only dynamic loss scaling (0) is "
                             "supported")
        for key in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
            if key in fp16 and not _auto(fp16[key]):
                out["engine"][f"fp16_{key}"] = fp16[key]
    elif fp16 or bf16:
        if not (_auto(fp16.get("enabled")) or _auto(bf16.get("enabled"))):
            out["engine"]["precision"] = "fp32"
    zero = dict(ds.pop("zero_optimization", {}) or {})
    if "stage" in zero:
        out["engine"]["zero_stage"] = zero.pop("stage")
    for key in ("gradient_clipping", "communication_data_type"):
        if key in ds and not _auto(ds[key]):
            out["engine"][key] = ds.pop(key)
        ds.pop(key, None)
    if "optimizer" in ds:
        out["optimizer"] = _read_optimizer(ds.pop("optimizer"), source)
    if "scheduler" in ds:
        out.update(_read_scheduler(ds.pop("scheduler"), source))
    if zero:
        ds["zero_optimization"] = zero
    if ds:
        out["engine"]["extra"] = ds
    return {k: v for k, v in out.items() if v}


def _read_optimizer(opt: dict, source: str) -> dict:
    kind = str(opt.get("type", "")).lower()
    names = {"lamb": "lamb", "adam": "adamw", "adamw": "adamw"}
    if kind not in names:
        raise ValueError(f"{source}: optimizer.type {opt.get('type')!r} unsupported (Lamb, Adam or AdamW)")
    params = opt.get("params", {})
    return {"name": names[kind], **{k: params[k] for k in ("lr", "betas", "eps", "weight_decay")
                                    if k in params and not _auto(params[k])}}


def _read_scheduler(sch: dict, source: str) -> dict:
    if sch.get("type") != "WarmupDecayLR":
        raise ValueError(f"{source}: scheduler.type {sch.get('type')!r} unsupported: use WarmupDecayLR or the "
                         "run config's schedule section")
    params = sch.get("params", {})
    out: dict = {"schedule": {"kind": "linear"}}
    for key, target in (("warmup_num_steps", "warmup_steps"), ("total_num_steps", "total_steps")):
        if key in params and not _auto(params[key]):
            out["schedule"][target] = params[key]
    if "warmup_max_lr" in params and not _auto(params["warmup_max_lr"]):
        out["optimizer"] = {"lr": params["warmup_max_lr"]}
    return out


def deepspeed_dict(engine: EngineConfig, batch: dict[str, int], hidden_size: int | None = None) -> dict:
    """The dict handed to deepspeed.initialize: ``batch`` is the resolved split for this world size
    (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)."""
    ds: dict = {**_HOUSEKEEPING, **batch, "gradient_clipping": engine.gradient_clipping,
                "zero_optimization": {"stage": engine.zero_stage}}
    if engine.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": engine.fp16_initial_scale_power,
                      "loss_scale_window": engine.fp16_loss_scale_window, "hysteresis": engine.fp16_hysteresis,
                      "min_loss_scale": engine.fp16_min_loss_scale}
    if engine.communication_data_type:
        ds["communication_data_type"] = engine.communication_data_type
    deep_merge(ds, engine.extra)
    zero = ds["zero_optimization"]
    for key, value in (("reduce_bucket_size", lambda h: h * h), ("stage3_prefetch_bucket_size",
                                                                  lambda h: int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", lambda h: 10 * h)):
        if _auto(zero.get(key)):
            if hidden_size is None:
                raise ValueError(f"zero_optimization.{key}: 'auto' needs the model's hidden size")
            zero[key] = value(hidden_size)
    return ds
