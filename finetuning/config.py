"""Typed fine-tuning configs with the BioBERT paper's defaults, validated on construction, parsed from the CLI.

Every field is a flag: ``learning_rate`` -> ``--learning-rate``; booleans get ``--x/--no-x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass


@dataclass
class FinetuneConfig:
    model: str = "minilm"  # HF BERT dir, URL, or "minilm" (the packaged model); see pretraining.hub
    data: str = ""  # directory with train/dev/test files of the task
    output_dir: str = "finetune_out"
    do_train: bool = True
    do_eval: bool = True  # score the dev set and write dev metrics
    select_on_dev: bool = True  # score dev after every epoch and keep the best epoch's weights (when there is a dev set)
    do_predict: bool = True  # predict the test set and write metrics.json + predictions
    max_seq_len: int = 128
    batch_size: int = 32  # per device
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    epochs: float = 3.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    max_train_examples: int | None = None  # subsample (seeded) for quick runs
    max_eval_examples: int | None = None
    num_threads: int | None = None  # torch CPU threads
    bucket_by_length: bool = True  # sort within shuffled pools so batches pad little
    progress: bool = True
    save_model: bool = True
    bf16: bool = False  # autocast on CUDA/CPU; under deepspeed, the bf16 engine
    deepspeed_config: str | None = None  # JSON for the deepspeed engine when launched by `deepspeed`
    zero_stage: int = 0  # used when no deepspeed_config is given

    def __post_init__(self) -> None:
        if self.max_seq_len < 16 or self.max_seq_len > 4096:
            raise ValueError(f"max_seq_len must be in [16, 4096], got {self.max_seq_len}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError("zero_stage must be 0, 1 or 2 (fine-tuned models are small; ZeRO-3 is not needed)")
        if not (self.do_train or self.do_eval or self.do_predict):
            raise ValueError("nothing to do: give at least one of --do-train/--do-eval/--do-predict")

    def output_path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)


@dataclass
class NERConfig(FinetuneConfig):
    tag_scheme: str = "auto"  # auto | iob1 | iob2 | iobes (of the input files; training uses IOB2 internally)
    window_overlap: int = 32  # subword tokens shared by consecutive windows of a long sentence
    epochs: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tag_scheme not in ("auto", "iob1", "iob2", "iobes"):
            raise ValueError(f"tag_scheme must be auto, iob1, iob2 or iobes, got {self.tag_scheme!r}")
        if not 0 <= self.window_overlap <= (self.max_seq_len - 2) // 2:
            raise ValueError(f"window_overlap must be in [0, {(self.max_seq_len - 2) // 2}] for this max_seq_len")


@dataclass
class REConfig(FinetuneConfig):
    cv_folds: int = 0  # > 1: stratified k-fold cross-validation over train (+dev) instead of the test split
    negative_label: str | None = None  # None: "0" for 0/1 data, "false" when present, else no negative class
    save_fold_models: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds must be 0 (no CV) or >= 2, got {self.cv_folds}")


@dataclass
class QAConfig(FinetuneConfig):
    max_seq_len: int = 384
    doc_stride: int = 128
    max_query_len: int = 64
    max_answer_len: int = 30  # subword tokens
    n_best: int = 20
    top_k: int = 5  # answers per question (BioASQ allows 5)
    batch_size: int = 24
    learning_rate: float = 5e-6
    epochs: float = 3.0
    holdout_fraction: float = 0.2  # questions held out as test when the data has no test file
    eval_snippets_per_question: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_query_len + 8 >= self.max_seq_len:
            raise ValueError("max_query_len must leave room for the context in max_seq_len")
        if not 0 < self.doc_stride < self.max_seq_len - self.max_query_len - 3:
            raise ValueError("doc_stride (tokens shared by neighbouring windows) must be in (0, max_seq_len - "
                             "max_query_len - 3): each window must move forward")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


_Cfg = typing.TypeVar("_Cfg", bound=FinetuneConfig)


def _scalar_type(hint) -> type:
    """The parser type of ``int | None`` is int; of ``str`` is str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _none_or(parse):
    return lambda s: None if s.lower() in ("none", "null", "") else parse(s)


def build_parser(
    *classes: type[FinetuneConfig], description: str = "", only_given: bool = False
) -> argparse.ArgumentParser:
    """A flag per config field (of several configs: union). ``only_given``: flags not on the command line are left
    out of the result, so the caller can overlay them on per-task defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            kind = _scalar_type(hints[f.name])
            default = argparse.SUPPRESS if only_given else f.default
            if kind is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
            else:
                parser.add_argument(flag, dest=f.name, type=_none_or(kind), default=default, help=kind.__name__)
    # The deepspeed launcher appends --local_rank; the rank is taken from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_config(cls: type[_Cfg], argv: list[str] | None = None, description: str = "") -> _Cfg:
    args = vars(build_parser(cls, description=description).parse_args(argv))
    args.pop("local_rank", None)
    try:
        return cls(**args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


__all__ = ["FinetuneConfig", "NERConfig", "REConfig", "QAConfig", "build_parser", "parse_config", "to_dict"]
