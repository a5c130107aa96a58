"""Typed run configuration: a recipe (YAML/JSON, packaged by name or a path) + its DeepSpeed JSON + overrides.

Layering (later wins): dataclass defaults < the DeepSpeed JSON, read into the typed sections (pretraining.ds_config:
batch, precision, ZeRO, clipping, optimizer, scheduler) < the run config file < command-line overrides
(``section.key=value``, or ``ds.key=value`` to edit the DeepSpeed JSON before it is read). A value set both in the run
config file and in the DeepSpeed JSON is an error unless they agree: a recipe must not be silently half-used. The
DeepSpeed dict DeepSpeed gets is generated from the typed config (:meth:`RunConfig.deepspeed_dict`). Relative paths in
a config resolve against the working directory of the command, as every path the user types does.

Batch sizes: the global batch holds at any world size; the recipe's micro-batch is a maximum (what fits on one
device) and :meth:`BatchConfig.derive` fits micro-batch and accumulation to the world size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from biobert import tracking
from biobert.config import (
    REQUIRED,
    build,
    check_choices,
    deep_merge,
    known_keys,
    option,
    parse_overrides,
    read_file,
    set_dotted,
)
from pretraining.ds_config import EngineConfig, deepspeed_dict, read_deepspeed, resolve_ds_config

BACKENDS = tracking.BACKENDS

PRESETS: dict[str, dict[str, Any]] = {
    # BertConfig fields for training from scratch; vocab_size comes from the tokenizer.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


# model.head_warmup_steps=auto on a start without MLM/NSP heads (capped at a tenth of the schedule): measured on
# MiniLM + MEDLINE, AdamW 1e-4, batch 32 (docs/continued_pretraining.md)
HEAD_WARMUP_AUTO = 100


@dataclass(kw_only=True)
class ModelConfig:
    """The model: continued from an HF BERT (init), or a preset from scratch."""

    init: str | None = option("minilm", "HF BERT directory, http(s) URL, 'minilm' (the packaged MiniLM-L6), or null "
                                        "for a preset from scratch")
    preset: str = option("base", "from scratch only: the architecture", choices=tuple(PRESETS))
    overrides: dict = option(factory=dict, help="BertConfig fields to change, e.g. {hidden_dropout_prob: 0.0, "
                                                "pad_vocab_multiple: 8}")
    tokenizer: str | None = option(None, "vocab.txt/tokenizer.json directory (default: the init model's, else the "
                                         "packaged BERT uncased vocab)")
    compile: bool = option(False, "torch.compile the encoder layers (dynamic shapes; the first step pays the "
                                   "compilation)")
    # Random heads' first gradients would otherwise rewrite the encoder (docs/continued_pretraining.md).
    head_warmup_steps: int | str = option("auto", "steps that train only the heads the init checkpoint lacks (loaded "
                                                  "weights held at lr 0) before the whole model trains; auto: "
                                                  f"min({HEAD_WARMUP_AUTO}, total_steps // 10) when the init lacks "
                                                  "heads, else 0")
    mlm_bias_init: str = option("auto", "MLM decoder bias of a start that lacks it: prior (log unigram frequency of "
                                        "the shards), zero (BERT's init); auto: prior when continuing, zero from "
                                        "scratch", choices=("auto", "prior", "zero"))

    def __post_init__(self) -> None:
        check_choices(self)
        if self.head_warmup_steps != "auto":
            try:
                self.head_warmup_steps = int(self.head_warmup_steps)
            except (TypeError, ValueError):
                raise ValueError(f"model.head_warmup_steps must be auto or a step count, got "
                                 f"{self.head_warmup_steps!r}") from None
            if self.head_warmup_steps < 0:
                raise ValueError(f"model.head_warmup_steps must be >= 0, got {self.head_warmup_steps}")


@dataclass(kw_only=True)
class DataConfig:
    """Pretraining shards and how they are read."""

    shard_dir: str = option(help="a data_prep output directory (or NVIDIA hdf5 shards)")
    masked_lm_prob: float = option(0.15, "dynamic-masking shards only: fraction of tokens masked")
    max_predictions: int | None = option(None, "masked slots per sample (default: the manifest's)")
    prefetch: int = option(2, "batches the reader thread prepares ahead")
    verify: bool = option(True, "check sha256, schema and id ranges of every shard before step 1 (split across "
                                "ranks)")
    skip_bad_shards: bool = option(False, "skip (and count) bad shards instead of stopping before step 1")
    start_sample: int = option(0, "global data position of a NEW run (continuing an exported checkpoint on another "
                                  "world size: its samples_consumed); a resumed run uses its checkpoint's")
    log_sample_ids: bool = option(False, "write the sample ids of every micro-batch to OUTPUT_DIR/sample_ids/ (one "
                                         "file per rank; proves no sample is lost or repeated across restarts)")
    validation_dir: str | None = option(None, "held-out shards for a shard_dir without a validation split (NVIDIA's "
                                              "layout: test/ beside training/); a data_prep split is found without it")

    def __post_init__(self) -> None:
        if self.start_sample < 0:
            raise ValueError(f"data.start_sample must be >= 0, got {self.start_sample}")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"data.masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer (LAMB as NVIDIA's BERT, or AdamW)."""

    name: str = option("lamb", "lamb or adamw", choices=("lamb", "adamw"))
    lr: float = option(1e-4, "peak learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam/LAMB betas")
    eps: float = option(1e-6, "Adam/LAMB epsilon")
    weight_decay: float = option(0.01, "decoupled weight decay on weight matrices (not biases or LayerNorm)")
    # ZeRO 1/2/3 hand the optimizer flat per-rank slices, so LAMB's per-tensor trust ratio becomes a per-slice one that
    # also changes with world size. Refused unless asked for by name (NVIDIA and bing_bert run LAMB without ZeRO).
    allow_lamb_with_zero: bool = option(False, "allow LAMB under ZeRO 1-3 (its trust ratio is then per partition)")

    def __post_init__(self) -> None:
        self.name = self.name.lower()
        check_choices(self)
        if self.name not in ("lamb", "adamw"):
            raise ValueError(f"optimizer.name {self.name!r} unknown (expected lamb or adamw)")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay to 0 at total_steps."""

    kind: str = option("linear", "linear or poly decay", choices=("linear", "poly"))
    warmup_steps: int = option(0, "optimizer steps of linear warmup from 0")
    total_steps: int | None = option(None, "where the decay reaches 0 (default: max_steps; set it to keep a longer "
                                           "run's schedule)")
    power: float = option(1.0, "poly only: the decay exponent (NVIDIA's BERT: 0.5)")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written, kept and resumed from."""

    every_steps: int = option(1000, "save every N optimizer steps (0: off)")
    every_minutes: float = option(0.0, "save every N minutes of wall time (0: off; rank 0's clock decides)")
    keep_last: int = option(3, "complete checkpoints kept (the newest is never deleted)")
    resume: str = option("auto", "auto (the newest complete one in OUTPUT_DIR/checkpoints), never, or a checkpoint "
                                 "directory")
    reshard: str = option("refuse", "a checkpoint from another world size / ZeRO stage: refuse (and say how to go on) "
                                    "or universal (convert with DeepSpeed's ds_to_universal)",
                          choices=("refuse", "universal"))

    def __post_init__(self) -> None:
        check_choices(self)
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every_steps/every_minutes must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    """Validation on the held-out split (data_prep's, or data.validation_dir): MLM loss, perplexity, MLM and NSP
    accuracy over a fixed subset, summed over ranks, at the same steps on every rank."""

    enabled: bool = option(True, "evaluate when there is validation data (a run without any says so once)")
    every_steps: int = option(1000, "evaluate after every N-th optimizer step (0: only at the end)")
    at_end: bool = option(True, "also evaluate after the last step")
    max_samples: int | None = option(2048, "the fixed subset: the split's first N samples in manifest order (data_prep "
                                           "shuffled them), trimmed to a multiple of the world size; null: all")
    micro_batch_size: int | None = option(None, "samples per forward pass on one rank (default: the training "
                                                "micro-batch)")

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        for name in ("max_samples", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"eval.{name} must be >= 1 (or null), got {value}")

    def due(self, step: int, max_steps: int) -> bool:
        """Whether step ``step`` ends with an evaluation: a function of the step number alone, so every rank (and a
        resumed run) decides the same."""
        return self.enabled and ((self.every_steps > 0 and step % self.every_steps == 0)
                                 or (self.at_end and step == max_steps))


@dataclass(kw_only=True)
class LoggingConfig:
    """What is logged where (metrics.jsonl always; report_to adds TensorBoard, MLflow, W&B)."""

    every_steps: int = option(10, "read the metrics from the device (one sync) every this many steps, and before "
                                  "every checkpoint; console and report_to backends follow it (metrics.jsonl still "
                                  "gets every step)")
    progress_bar: bool = option(True, "a tqdm bar on rank 0")
    report_to: list[str] = option(factory=lambda: ["tensorboard"], choices=BACKENDS,
                                  help="tensorboard, mlflow, wandb (several at once), or none; mlflow and wandb are "
                                       "optional installs ('biobert-at-scale[mlflow]', '[wandb]')")
    tensorboard: bool | None = option(None, "the older switch: false drops tensorboard from report_to, true adds it")
    project: str = option("biobert-pretraining", "MLflow experiment / W&B project")
    run_name: str | None = option(None, "MLflow / W&B run name (default: the output directory's name)")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file store "
                                            "in OUTPUT_DIR/mlruns)")
    peak_tflops: float | None = option(None, "device peak for MFU (default: the data-sheet table for GPUs, a matmul "
                                             "probe on CPU)")

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"logging.every_steps must be >= 1, got {self.every_steps}")
        self.backends()  # 'none' with a backend, an unknown name: refused here

    def backends(self) -> list[str]:
        return tracking.resolve(self.report_to, self.tensorboard, "logging.report_to")


@dataclass(kw_only=True)
class NumericsConfig:
    """Loss health checks (pretraining.numerics)."""

    spike_factor: float = option(2.0, "loss > factor x running median -> loss_spike in the metrics + a warning")
    spike_window: int = option(50, "steps in the running median")
    spike_min_history: int = option(10, "no spike verdict before this many finite losses")
    max_overflow_streak: int = option(50, "fp16: consecutive overflow-skipped steps before the run is stopped")

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.spike_window < 1 or self.spike_min_history < 1:
            raise ValueError("numerics: spike_factor must be > 1, spike_window and spike_min_history >= 1")
        if self.max_overflow_streak < 1:
            raise ValueError(f"numerics.max_overflow_streak must be >= 1, got {self.max_overflow_streak}")


@dataclass(kw_only=True)
class BatchConfig:
    """Global batch from the DeepSpeed config; the micro-batch there is a maximum (what fits on one device).

    For a world size W: per_rank = global / W (must divide: the only way a run is refused), micro = the largest divisor
    of per_rank that is <= the maximum, accumulation = per_rank / micro. So a recipe's global batch holds on 1 GPU
    (192 = 24 x 8 steps) and on 32 (192 = 6 x 1 x 32) alike. gradient_accumulation_steps in the config only matters
    without a micro-batch (maximum = per_rank / accumulation); without a global batch, global = micro x accum x W.
    """

    global_batch_size: int | None = option(None, "samples per optimizer step, all ranks together")
    micro_batch_size: int | None = option(None, "the largest micro-batch one rank takes (the one used is the largest "
                                                "divisor of global / world size that fits)")
    grad_accum_steps: int | None = option(None, "micro-batches per optimizer step on one rank (only without a "
                                                "micro-batch size)")

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"batch: {name} must be a positive integer, got {value!r}")

    def derive(self, world_size: int) -> tuple[int, int]:
        """-> (micro batch, gradient accumulation steps) for `world_size` ranks."""
        g, m, a = self.global_batch_size, self.micro_batch_size, self.grad_accum_steps
        if g is None:
            if m is None:
                raise ValueError("DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu")
            return m, a or 1
        if g % world_size:
            raise ValueError(f"global batch {g} is not divisible by the world size {world_size}: "
                             f"{_nearest_choices(g, world_size)}")
        per_rank = g // world_size
        most = m if m is not None else max(1, per_rank // a) if a is not None else per_rank
        micro = max(d for d in range(1, min(most, per_rank) + 1) if per_rank % d == 0)
        return micro, per_rank // micro

    def grad_accum(self, world_size: int) -> int:
        return self.derive(world_size)[1]

    def micro(self, world_size: int) -> int:
        return self.derive(world_size)[0]

    def resolved(self, world_size: int) -> dict[str, int]:
        """The three DeepSpeed keys, consistent with world_size (written back into the DeepSpeed config)."""
        m, a = self.derive(world_size)
        return dict(train_batch_size=m * a * world_size, train_micro_batch_size_per_gpu=m,
                    gradient_accumulation_steps=a)


def _nearest_choices(global_batch: int, world: int) -> str:
    below, above = global_batch - global_batch % world, global_batch - global_batch % world + world
    worlds = [w for w in (next((w for w in range(world - 1, 0, -1) if global_batch % w == 0), None),
                          next((w for w in range(world + 1, global_batch + 1) if global_batch % w == 0), None)) if w]
    batches = " or ".join(str(b) for b in (below, above) if b > 0)
    return (f"set batch.global_batch_size={batches.replace(' or ', ' or batch.global_batch_size=')}, or run on "
            f"{' or '.join(map(str, worlds))} ranks (world sizes that divide {global_batch})")


@dataclass(kw_only=True)
class RunConfig:
    """A pretraining run."""

    output_dir: str = option(help="run directory: checkpoints/, metrics.jsonl, run_record.json, TensorBoard events")
    max_steps: int = option(help="optimizer steps to train to (a resumed run continues to the same number)")
    seed: int = option(42, "seed of initialisation, data order, masking and dropout")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON: a path, or a packaged recipe name (ds_configs/); "
                                                "its batch, precision, ZeRO, optimizer and scheduler fill the sections "
                                                "below")
    model: ModelConfig = option(factory=ModelConfig)
    data: DataConfig = option(help="the shards")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig)
    schedule: ScheduleConfig = option(factory=ScheduleConfig)
    batch: BatchConfig = option(factory=BatchConfig)
    engine: EngineConfig = option(factory=EngineConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    eval: EvalConfig = option(factory=EvalConfig)
    logging: LoggingConfig = option(factory=LoggingConfig)
    numerics: NumericsConfig = option(factory=NumericsConfig)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.schedule.total_steps is None:
            self.schedule.total_steps = self.max_steps
        if self.schedule.warmup_steps > self.schedule.total_steps:
            raise ValueError(f"schedule.warmup_steps {self.schedule.warmup_steps} > total_steps "
                             f"{self.schedule.total_steps}")
        if self.batch.global_batch_size is None and self.batch.micro_batch_size is None:
            raise ValueError("no batch size: set batch.global_batch_size (or train_batch_size in the DeepSpeed JSON)")
        heads = self.model.head_warmup_steps
        if heads != "auto" and heads and heads + self.schedule.warmup_steps >= self.schedule.total_steps:
            raise ValueError(f"model.head_warmup_steps {heads} + schedule.warmup_steps {self.schedule.warmup_steps} "
                             f">= total_steps {self.schedule.total_steps}: no step would train the whole model")
        if self.optimizer.name == "lamb" and self.zero_stage > 0 and not self.optimizer.allow_lamb_with_zero:
            raise ValueError(
                f"LAMB with ZeRO stage {self.zero_stage}: ZeRO gives the optimizer flat per-rank partitions, so LAMB's "
                "layer-wise trust ratio would be computed per partition (and change with world size). Use ZeRO stage 0 "
                "with LAMB (engine.zero_stage=0), AdamW with ZeRO, or set optimizer.allow_lamb_with_zero=true.")

    def grad_accum(self, world_size: int) -> int:
        return self.batch.grad_accum(world_size)

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_stage

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def deepspeed_dict(self, world_size: int, hidden_size: int | None = None) -> dict:
        """The DeepSpeed config for this world size, generated from the typed settings."""
        return deepspeed_dict(self.engine, self.batch.resolved(world_size), hidden_size)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ---------------------------------------------------------------- loading


def packaged_run_configs() -> Path:
    return Path(__file__).parent / "configs"


def resolve_run_config(spec: str | Path) -> Path:
    """A run config: an existing path (relative to the working directory), else a packaged recipe by name
    (``biobert_continued_seq512``, with or without ``.yaml``)."""
    import difflib

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = Path(str(spec)).name
    for candidate in (name, f"{name}.yaml", f"{name}.yml", f"{name}.json"):
        packaged = packaged_run_configs() / candidate
        if packaged.is_file():
            return packaged
    known = sorted(p.stem for p in packaged_run_configs().glob("*.yaml"))
    close = difflib.get_close_matches(Path(name).stem, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"packaged recipes: {', '.join(known)}"
    raise FileNotFoundError(f"run config {str(spec)!r}: no such file, and not a packaged recipe; {hint}")


def load_config(run_config: str | Path | dict, deepspeed_config: str | Path | dict | None = None,
                overrides: list[str] | list[tuple[str, Any]] | None = None) -> RunConfig:
    """Build a validated RunConfig. ``overrides``: ``section.key=value`` strings or (key, value) pairs; keys starting
    with ``ds.`` edit the DeepSpeed JSON before it is read."""
    if isinstance(run_config, dict):
        run, run_src = json.loads(json.dumps(run_config)), "run config"
    else:
        path = resolve_run_config(run_config)
        run, run_src = read_file(path), str(path)
    pairs = [p if isinstance(p, tuple) else parse_overrides([p])[0] for p in overrides or []]
    ds_spec = deepspeed_config if deepspeed_config is not None else run.get("deepspeed_config")
    for key, value in pairs:
        if key == "deepspeed_config":
            ds_spec = value
    run.pop("deepspeed_config", None)
    ds, ds_src = {}, None
    if isinstance(ds_spec, dict):
        ds, ds_src = json.loads(json.dumps(ds_spec)), "DeepSpeed config"
    elif ds_spec is not None:
        ds_path = resolve_ds_config(ds_spec)
        ds, ds_src = read_file(ds_path), str(ds_path)
    cli: dict = {}
    for key, value in pairs:
        if key.startswith("ds."):
            set_dotted(ds, key[3:], value)
            ds_src = ds_src or "ds. overrides"
        elif key != "deepspeed_config":
            set_dotted(cli, key, value)
    from_ds = read_deepspeed(ds, ds_src) if ds_src else {}
    for section, values in from_ds.items():
        mine = run.get(section)
        for key, value in values.items():
            theirs = mine.get(key) if isinstance(mine, dict) else None
            if theirs is not None and theirs != REQUIRED and _norm(theirs) != _norm(value):
                raise ValueError(f"{section}.{key} is {theirs!r} in {run_src} but {value!r} in {ds_src}: set it in "
                                 "one place (or override it on the command line)")
    merged: dict = {}
    for layer in (from_ds, run, cli):
        deep_merge(merged, layer)
    if ds_src:
        merged["deepspeed_config"] = ds_src
    return build(RunConfig, merged, "")


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


RUN_KEYS = known_keys(RunConfig)
