"""Typed fine-tuning configs, validated on construction, parsed from the CLI, with named recipes.

Every field is a flag: ``learning_rate`` -> ``--learning-rate``; booleans get ``--x/--no-x``; the help text is the
field's ``metadata["help"]``. A recipe is data (``RECIPES``: name -> task -> field values) applied by ``make_config``
under the values given explicitly: "quick" (the field defaults, short CPU runs) and "biobert" (the paper's settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar


def _f(default, help: str):
    """A config field with its help text (the CLI's --help reads it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Defaults are the "quick" recipe: few epochs, sized for a CPU run. ``--recipe biobert`` gives the paper's."""

    task: ClassVar[str] = ""
    recipe: str = _f("quick", "quick: short runs sized for a CPU (the defaults shown here); biobert: the BioBERT "
                              "paper's per-task settings (more epochs, selection on dev). Flags given override it")
    model: str = _f("minilm", 'HF BERT directory, URL, or "minilm" (the packaged MiniLM); see pretraining.hub')
    data: str = _f("", "directory with the task's train/dev/test files")
    output_dir: str = _f("finetune_out", "metrics.json, predictions and the fine-tuned model go here")
    do_train: bool = _f(True, "fine-tune on the train split")
    do_eval: bool = _f(True, "score the dev set and write dev metrics")
    select_on_dev: bool = _f(True, "score dev after every epoch and keep the best epoch's weights (when there is a "
                                   "dev set; ties go to the later epoch)")
    do_predict: bool = _f(True, "predict the test set and write metrics.json + predictions")
    max_seq_len: int = _f(128, "subword tokens per model input, [CLS] and [SEP] included")
    batch_size: int = _f(32, "training examples per step, per device")
    eval_batch_size: int = _f(64, "examples per forward pass when predicting")
    learning_rate: float = _f(5e-5, "peak AdamW learning rate")
    epochs: float = _f(3.0, "passes over the training set (a fraction stops part-way)")
    # No warmup in the quick recipe: on a short schedule a 10% warmup delays the escape from the all-"O" solution of
    # a sparse entity type into the steps where the decaying learning rate is small (finetuning/README.md).
    warmup_ratio: float = _f(0.0, "share of the steps with a linear warmup from 0 (then linear decay to 0)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    seed: int = _f(42, "seeds the data order, dropout, the new head and subsampling")
    max_train_examples: int | None = _f(None, "use a seeded random subset of this many training examples")
    max_eval_examples: int | None = _f(None, "use a seeded random subset of this many dev/test examples")
    num_threads: int | None = _f(None, "torch CPU threads (default: torch's)")
    bucket_by_length: bool = _f(True, "batch examples of similar length (less padding, faster); pools stay small "
                                      "enough that batches still change between epochs")
    progress: bool = _f(True, "progress bars and one line per epoch")
    save_model: bool = _f(True, "write the fine-tuned model to OUTPUT_DIR/model")
    bf16: bool = _f(False, "bf16 autocast on CUDA/CPU; under deepspeed, the bf16 engine")
    deepspeed_config: str | None = _f(None, "JSON for the deepspeed engine when launched by `deepspeed`")
    zero_stage: int = _f(0, "ZeRO stage when no deepspeed_config is given (0, 1 or 2)")

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
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
    task: ClassVar[str] = "ner"
    tag_scheme: str = _f("auto", "tag scheme of the input files: auto, iob1, iob2 or iobes (training uses IOB2)")
    window_overlap: int = _f(32, "subword tokens shared by consecutive windows of a sentence longer than one window")
    epochs: float = _f(5.0, "passes over the training set (a fraction stops part-way)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tag_scheme not in ("auto", "iob1", "iob2", "iobes"):
            raise ValueError(f"tag_scheme must be auto, iob1, iob2 or iobes, got {self.tag_scheme!r}")
        if not 0 <= self.window_overlap <= (self.max_seq_len - 2) // 2:
            raise ValueError(f"window_overlap must be in [0, {(self.max_seq_len - 2) // 2}] for this max_seq_len")


@dataclass
class REConfig(FinetuneConfig):
    task: ClassVar[str] = "re"
    cv_folds: int = _f(0, "> 1: stratified k-fold cross-validation over train (+dev) instead of the test split")
    negative_label: str | None = _f(None, 'the class left out of micro P/R/F1 (default: "0" for 0/1 data, "false" '
                                          "when present, else none)")
    save_fold_models: bool = _f(False, "write each fold's fine-tuned model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds must be 0 (no CV) or >= 2, got {self.cv_folds}")


@dataclass
class QAConfig(FinetuneConfig):
    task: ClassVar[str] = "qa"
    max_seq_len: int = _f(384, "subword tokens per window: question + snippet slice + 3 special tokens")
    doc_stride: int = _f(128, "tokens a window moves forward along a long snippet")
    max_query_len: int = _f(64, "question tokens kept")
    max_answer_len: int = _f(30, "longest answer span, in subword tokens")
    n_best: int = _f(20, "candidate spans kept per snippet")
    top_k: int = _f(5, "answers per question (BioASQ allows 5)")
    batch_size: int = _f(24, "training examples per step, per device")
    learning_rate: float = _f(5e-6, "peak AdamW learning rate")
    epochs: float = _f(3.0, "passes over the training set (a fraction stops part-way)")
    holdout_fraction: float = _f(0.2, "questions held out as test when the data has no test file")
    eval_snippets_per_question: int | None = _f(None, "cap on snippets scored per question")

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

# Recipe name -> task -> field overrides (on top of the field defaults, which are "quick"). "biobert" is the paper's
# protocol (Lee et al. 2020, Sec. 3.3: batch 10-64, lr 1e-5 to 5e-5, up to 20 epochs for NER, the epoch chosen on dev)
# with the per-task values of dmis-lab/biobert-pytorch (NER seq 192; RE seq 128, 3 epochs; QA batch 12, lr 8e-6) and
# BERT's 10% warmup (its run_classifier/run_squad warmup_proportion, kept by BioBERT's TensorFlow scripts).
RECIPES: dict[str, dict[str, dict]] = {
    "quick": {},
    "biobert": {
        "ner": {"epochs": 20.0, "batch_size": 32, "learning_rate": 5e-5, "max_seq_len": 192, "warmup_ratio": 0.1,
                "select_on_dev": True},
        "re": {"epochs": 3.0, "batch_size": 32, "learning_rate": 5e-5, "max_seq_len": 128, "warmup_ratio": 0.1,
               "select_on_dev": True},
        "qa": {"epochs": 3.0, "batch_size": 12, "learning_rate": 8e-6, "max_seq_len": 384, "warmup_ratio": 0.1},
    },
}


def make_config(cls: type[_Cfg], recipe: str = "quick", **values) -> _Cfg:
    """``cls`` with the recipe's values for its task under the explicitly given ``values``."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return cls(**{**RECIPES[recipe].get(cls.task, {}), **values, "recipe": recipe})


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
    """A flag per config field (of several configs: union), its help from the field's metadata, the quick recipe's
    default shown (or "per task"), the other recipes listed below. ``only_given``: flags not on the command line are
    left out of the result, so the caller can overlay them on a recipe and per-task defaults."""
    epilog = "\n".join(f"--recipe {name}: " + "; ".join(f"{cls.task}: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in per_task.get(cls.task, {}).items()) for cls in classes)
        for name, per_task in RECIPES.items() if per_task)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fields: dict[str, list] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, [f, _scalar_type(hints[f.name]), set()])[2].add(repr(f.default))
    for name, (f, kind, defaults) in fields.items():
        flag = "--" + name.replace("_", "-")
        default = argparse.SUPPRESS if only_given else f.default
        shown = "per task" if len(defaults) > 1 else ("on" if f.default is True else "off" if f.default is False
                                                      else f.default)
        text = f"{f.metadata.get('help', '')} (default: {shown})"
        if name == "recipe":
            parser.add_argument(flag, dest=name, choices=sorted(RECIPES), default=default, help=text)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=name, type=_none_or(kind), default=default, metavar=kind.__name__.upper(),
                                help=text)
    # The deepspeed launcher appends --local_rank; the rank is taken from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_config(cls: type[_Cfg], argv: list[str] | None = None, description: str = "") -> _Cfg:
    """The flags given on top of the chosen recipe (--recipe, default quick) on top of the field defaults."""
    args = vars(build_parser(cls, description=description, only_given=True).parse_args(argv))
    args.pop("local_rank", None)
    try:
        return make_config(cls, **args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


__all__ = ["FinetuneConfig", "NERConfig", "REConfig", "QAConfig", "RECIPES", "build_parser", "make_config",
           "parse_config", "to_dict"]
