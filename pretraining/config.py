"""Typed run configuration: YAML/JSON run config + a DeepSpeed JSON config + `key=value` CLI overrides.

Layering (later wins): dataclass defaults < the DeepSpeed config's ``optimizer``/``scheduler`` sections (DeepSpeed's
own schema, so ``ds_configs/*.json`` are complete recipes) < the run config file < CLI overrides. A value set both in
the run config file and in the DeepSpeed config is an error unless they agree: a recipe must not be silently half-used.
Overrides starting with ``ds.`` edit the DeepSpeed config (``ds.train_micro_batch_size_per_gpu=4``).

Batch sizes belong to the DeepSpeed config (``train_batch_size`` = global, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``); :meth:`BatchConfig.grad_accum` checks they agree with the world size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESETS: dict[str, dict[str, Any]] = {
    # BertConfig fields for training from scratch; vocab_size comes from the tokenizer.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


# model.head_warmup_steps=auto on a start without MLM/NSP heads (capped at a tenth of the schedule): measured on
# MiniLM + MEDLINE, AdamW 1e-4, batch 32 (docs/continued_pretraining.md)
HEAD_WARMUP_AUTO = 100


@dataclass
class ModelConfig:
    init: str | None = "minilm"  # HF BERT dir, "minilm"/"default", or URL (pretraining.hub); None = from scratch
    preset: str = "base"  # from scratch only: tiny | base | large
    overrides: dict = field(default_factory=dict)  # BertConfig fields, e.g. {hidden_dropout_prob: 0.0}
    tokenizer: str | None = None  # vocab.txt/tokenizer.json dir; default: the init dir, else the packaged BERT vocab
    # Steps that train only the heads the init checkpoint lacks (the loaded weights held still, lr factor 0), before
    # the whole model trains. Random heads' first gradients would otherwise rewrite the encoder. "auto": a warm-up
    # (HEAD_WARMUP_AUTO) when the init lacks heads, none when it has them or training starts from scratch.
    head_warmup_steps: str | int = "auto"
    # The MLM decoder bias of a start that lacks it: "prior" = log unigram frequency of the shards (no representation
    # has to learn it), "zero" = BERT's init. auto: prior for continued pretraining, zero from scratch.
    mlm_bias_init: str = "auto"

    def __post_init__(self) -> None:
        if self.init is None and self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} unknown (expected one of {sorted(PRESETS)})")
        if self.mlm_bias_init not in ("auto", "prior", "zero"):
            raise ValueError(f"model.mlm_bias_init must be auto, prior or zero, got {self.mlm_bias_init!r}")
        if self.head_warmup_steps != "auto":
            try:
                self.head_warmup_steps = int(self.head_warmup_steps)
            except (TypeError, ValueError):
                raise ValueError(f"model.head_warmup_steps must be auto or a step count, got "
                                 f"{self.head_warmup_steps!r}") from None
            if self.head_warmup_steps < 0:
                raise ValueError(f"model.head_warmup_steps must be >= 0, got {self.head_warmup_steps}")


@dataclass
class DataConfig:
    shard_dir: str = ""
    masked_lm_prob: float = 0.15  # dynamic-masking shards only
    max_predictions: int | None = None  # default: the manifest's
    prefetch: int = 2
    verify: bool = True  # sha256/schema/id-range check of every shard before step 1 (split across ranks)
    skip_bad_shards: bool = False  # False: a bad shard stops the run before step 1
    # Global data position of a NEW run (continuing an exported checkpoint on another world size: its
    # samples_consumed); ignored when resuming from a checkpoint, which carries its own position.
    start_sample: int = 0

    def __post_init__(self) -> None:
        if self.start_sample < 0:
            raise ValueError(f"data.start_sample must be >= 0, got {self.start_sample}")
        if not self.shard_dir:
            raise ValueError("data.shard_dir is required (a data_prep output directory or NVIDIA hdf5 shards)")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"data.masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")


@dataclass
class OptimizerConfig:
    name: str = "lamb"  # lamb | adamw
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    # ZeRO 1/2/3 hand the optimizer flat per-rank slices, so LAMB's per-tensor trust ratio becomes a per-slice one that
    # also changes with world size. Refused unless asked for by name (NVIDIA and bing_bert run LAMB without ZeRO).
    allow_lamb_with_zero: bool = False

    def __post_init__(self) -> None:
        self.name = self.name.lower()
        if self.name not in ("lamb", "adamw"):
            raise ValueError(f"optimizer.name {self.name!r} unknown (expected lamb or adamw)")
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0 or len(self.betas) != 2:
            raise ValueError(f"optimizer: lr must be > 0 and betas a pair, got lr={self.lr} betas={self.betas}")


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # linear | poly (warmup, then decay to 0 at total_steps)
    warmup_steps: int = 0
    total_steps: int | None = None  # default: train max_steps (set this to keep the decay of a longer run)
    power: float = 1.0  # poly only

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "poly"):
            raise ValueError(f"schedule.kind {self.kind!r} unknown (expected linear or poly)")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = off
    every_minutes: float = 0.0  # 0 = off; rank 0's clock decides for everyone
    keep_last: int = 3  # never fewer than 1: the newest complete checkpoint is never deleted
    resume: str = "auto"  # auto (newest complete in output_dir/checkpoints) | never | a checkpoint dir
    # A checkpoint from another world size / ZeRO stage: "refuse" (with the recipe) or "universal" (convert it with
    # DeepSpeed's ds_to_universal and load it with load_universal; ZeRO 1-3)
    reshard: str = "refuse"

    def __post_init__(self) -> None:
        if self.reshard not in ("refuse", "universal"):
            raise ValueError(f"checkpoint.reshard must be refuse or universal, got {self.reshard!r}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every_steps/every_minutes must be >= 0")


@dataclass
class LoggingConfig:
    every_steps: int = 1  # console/TensorBoard cadence; metrics.jsonl gets every step
    progress_bar: bool = True
    tensorboard: bool = True
    peak_tflops: float | None = None  # device peak for MFU; default: table (GPU) or a matmul probe (CPU)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"logging.every_steps must be >= 1, got {self.every_steps}")


@dataclass
class NumericsConfig:
    """Loss health checks (pretraining.numerics)."""

    spike_factor: float = 2.0  # loss > factor x running median -> loss_spike in the metrics + a warning
    spike_window: int = 50  # steps in the running median
    spike_min_history: int = 10  # no spike verdict before this many finite losses
    max_overflow_streak: int = 50  # fp16: consecutive overflow-skipped steps before the run is stopped

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.spike_window < 1 or self.spike_min_history < 1:
            raise ValueError("numerics: spike_factor must be > 1, spike_window and spike_min_history >= 1")
        if self.max_overflow_streak < 1:
            raise ValueError(f"numerics.max_overflow_streak must be >= 1, got {self.max_overflow_streak}")


@dataclass
class BatchConfig:
    """Global/micro batch from the DeepSpeed config; gradient accumulation derives from the world size."""

    global_batch_size: int | None
    micro_batch_size: int | None
    grad_accum_steps: int | None = None

    def grad_accum(self, world_size: int) -> int:
        g, m, a = self.global_batch_size, self.micro_batch_size, self.grad_accum_steps
        if g is None and m is None:
            raise ValueError("DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu")
        if m is None:
            a = a or 1
            m, rem = divmod(g, a * world_size)
            if rem or m == 0:
                raise ValueError(f"train_batch_size {g} is not divisible by gradient_accumulation_steps {a} x "
                                 f"world size {world_size}")
        if g is None:
            g = m * (a or 1) * world_size
        if a is None:
            a, rem = divmod(g, m * world_size)
            if rem or a == 0:
                raise ValueError(f"train_batch_size {g} is not a multiple of micro batch {m} x world size {world_size} "
                                 f"= {m * world_size}: change the batch sizes or the number of ranks")
        if g != m * a * world_size:
            raise ValueError(f"train_batch_size {g} != micro batch {m} x gradient_accumulation_steps {a} x world size "
                             f"{world_size} = {m * a * world_size}: drop one of the three to derive it")
        return a

    def micro(self, world_size: int) -> int:
        a = self.grad_accum(world_size)
        return self.micro_batch_size or self.global_batch_size // (a * world_size)

    def resolved(self, world_size: int) -> dict[str, int]:
        """The three DeepSpeed keys, consistent with world_size (written back into the DeepSpeed config)."""
        a, m = self.grad_accum(world_size), self.micro(world_size)
        return dict(train_batch_size=m * a * world_size, train_micro_batch_size_per_gpu=m,
                    gradient_accumulation_steps=a)


@dataclass
class RunConfig:
    output_dir: str
    max_steps: int
    data: DataConfig
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    deepspeed: dict = field(default_factory=dict)  # the DeepSpeed config (optimizer/scheduler sections removed)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.schedule.total_steps is None:
            self.schedule.total_steps = self.max_steps
        if self.schedule.warmup_steps > self.schedule.total_steps:
            raise ValueError(f"schedule.warmup_steps {self.schedule.warmup_steps} > total_steps "
                             f"{self.schedule.total_steps}")
        heads = self.model.head_warmup_steps
        if heads != "auto" and heads and heads + self.schedule.warmup_steps >= self.schedule.total_steps:
            raise ValueError(f"model.head_warmup_steps {heads} + schedule.warmup_steps {self.schedule.warmup_steps} "
                             f">= total_steps {self.schedule.total_steps}: no step would train the whole model")
        for key in ("optimizer", "scheduler"):
            if key in self.deepspeed:
                raise ValueError(f"DeepSpeed config still has an {key!r} section: build configs with load_config()")
        if self.optimizer.name == "lamb" and self.zero_stage > 0 and not self.optimizer.allow_lamb_with_zero:
            raise ValueError(
                f"LAMB with ZeRO stage {self.zero_stage}: ZeRO gives the optimizer flat per-rank partitions, so LAMB's "
                "layer-wise trust ratio would be computed per partition (and change with world size). Use ZeRO stage 0 "
                "with LAMB (ds.zero_optimization.stage=0), AdamW with ZeRO, or set optimizer.allow_lamb_with_zero=true.")

    @property
    def batch(self) -> BatchConfig:
        ds = self.deepspeed
        return BatchConfig(ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu"),
                           ds.get("gradient_accumulation_steps"))

    def grad_accum(self, world_size: int) -> int:
        return self.batch.grad_accum(world_size)

    @property
    def precision(self) -> str:
        if self.deepspeed.get("fp16", {}).get("enabled"):
            return "fp16"
        if self.deepspeed.get("bf16", {}).get("enabled"):
            return "bf16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- loading


def read_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    for parse in (json.loads, yaml.safe_load):  # JSON first: YAML 1.1 reads 1e-4 as a string
        try:
            return parse(text)  # 1e-4 -> float, [0.9, 0.98] -> list, null -> None, true -> bool
        except (json.JSONDecodeError, yaml.YAMLError):
            pass
    return text


def _coerce(annotation: str, value: Any, where: str) -> Any:
    """YAML hands over '1e-4' as a string and 5 where a float is meant: convert numbers by the field's type."""
    kind = annotation.split("|")[0].strip()
    if value is None or kind not in ("float", "int") or isinstance(value, bool):
        return value
    try:
        return float(value) if kind == "float" else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    tree[leaf] = value


def ds_sections_to_run(ds: dict, source: str) -> dict:
    """Translate a DeepSpeed config's optimizer/scheduler sections into run-config values (DeepSpeed's own schema)."""
    out: dict[str, dict] = {}
    if "optimizer" in ds:
        opt = ds["optimizer"]
        kind = str(opt.get("type", "")).lower()
        names = {"lamb": "lamb", "adam": "adamw", "adamw": "adamw"}
        if kind not in names:
            raise ValueError(f"{source}: optimizer.type {opt.get('type')!r} unsupported (Lamb, Adam or AdamW)")
        params = opt.get("params", {})
        out["optimizer"] = {"name": names[kind]}
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in params:
                out["optimizer"][key] = params[key]
    if "scheduler" in ds:
        sch = ds["scheduler"]
        if sch.get("type") != "WarmupDecayLR":
            raise ValueError(f"{source}: scheduler.type {sch.get('type')!r} unsupported: use WarmupDecayLR or the "
                             "run config's schedule section")
        params = sch.get("params", {})
        out["schedule"] = {"kind": "linear"}
        if "warmup_num_steps" in params:
            out["schedule"]["warmup_steps"] = params["warmup_num_steps"]
        if "total_num_steps" in params:
            out["schedule"]["total_steps"] = params["total_num_steps"]
        if "warmup_max_lr" in params:
            out.setdefault("optimizer", {})["lr"] = params["warmup_max_lr"]
    return out


def _build(cls, values: dict, where: str):
    """Instantiate a (nested) dataclass from a dict, naming unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    if cls is RunConfig:  # a missing section still validates, so a missing data.shard_dir is named as such
        values = {**{name: {} for name in _SECTIONS}, **values}
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get(name) if cls is RunConfig else None
        kwargs[name] = (_build(sub, value or {}, f"{where}.{name}") if sub
                        else _coerce(str(known[name].type), value, f"{where}.{name}"))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
             "checkpoint": CheckpointConfig, "logging": LoggingConfig, "numerics": NumericsConfig}


def load_config(run_config: str | Path | dict, deepspeed_config: str | Path | dict | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Build a validated RunConfig. ``overrides`` are ``section.key=value`` strings (``ds.key=value`` for DeepSpeed)."""
    run = dict(read_file(run_config)) if not isinstance(run_config, dict) else json.loads(json.dumps(run_config))
    run_src = str(run_config) if not isinstance(run_config, dict) else "run config"
    if deepspeed_config is None:
        deepspeed_config = run.pop("deepspeed_config", None)
        if deepspeed_config is not None and not Path(deepspeed_config).is_absolute() and not isinstance(
                run_config, dict):
            # relative to the working directory first (how users type it), then to the run config file
            if not Path(deepspeed_config).exists():
                deepspeed_config = Path(run_config).parent / deepspeed_config
    else:
        run.pop("deepspeed_config", None)
    if deepspeed_config is None:
        raise ValueError(f"{run_src}: no DeepSpeed config (pass --deepspeed_config or set deepspeed_config)")
    ds = dict(read_file(deepspeed_config)) if not isinstance(deepspeed_config, dict) else dict(deepspeed_config)
    ds_src = str(deepspeed_config) if not isinstance(deepspeed_config, dict) else "DeepSpeed config"

    cli: dict = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-4)")
        if key.startswith("ds."):
            _set_dotted(ds, key[3:], _parse_value(value))
        else:
            _set_dotted(cli, key, _parse_value(value))

    from_ds = ds_sections_to_run(ds, ds_src)
    for section, values in from_ds.items():
        for key, value in values.items():
            mine = run.get(section, {}).get(key) if isinstance(run.get(section), dict) else None
            if mine is not None and _norm(mine) != _norm(value):
                raise ValueError(f"{section}.{key} is {mine!r} in {run_src} but {value!r} in {ds_src}: set it in one "
                                 "place (or override it on the command line)")
    merged: dict = {}
    for layer in (from_ds, run, cli):
        _deep_merge(merged, layer)
    merged["deepspeed"] = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    return _build(RunConfig, merged, run_src)


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        elif isinstance(v, dict):
            dst[k] = json.loads(json.dumps(v))
        else:
            dst[k] = v
