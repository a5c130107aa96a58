"""Typed fine-tuning configs, validated on construction; every field is a flag of `biobert ner|re|qa` (biobert.config).

The defaults are the quick recipe: settings that learn in minutes on a CPU with the packaged MiniLM. The HF
TrainingArguments spellings (``--learning_rate``, ``--num_train_epochs``, ``--per_device_train_batch_size``,
``--output_dir``, ``--model_name_or_path``...) are accepted as aliases. A recipe is data (``RECIPES``: name -> task ->
field values) laid under the values given explicitly (flags, key=value): "quick" (the field defaults) and "biobert"
(the paper's per-task settings, ``--recipe biobert``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from typing import ClassVar

from biobert import tracking
from biobert.config import build, check_choices, option, parse, read_file


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning settings shared by NER, RE and QA. The defaults are the "quick" recipe; ``--recipe biobert`` gives
    the paper's."""

    task: ClassVar[str] = ""
    recipe: str = option("quick", "quick: short runs sized for a CPU (the defaults shown here); biobert: the BioBERT "
                                  "paper's per-task settings (more epochs, selection on dev). Flags given override it",
                         choices=("quick", "biobert"))
    model: str = option("minilm", "HF BERT directory, http(s) URL, or 'minilm' (the packaged MiniLM-L6)",
                        aliases=["--model_name_or_path"])
    data: str = option(help="task directory with the train/dev/test files")
    output_dir: str = option("finetune_out", "where metrics.json, the predictions and the fine-tuned model go")
    do_train: bool = option(True, "fine-tune on the train split")
    do_eval: bool = option(True, "score the dev split and write dev metrics")
    select_on_dev: bool = option(True, "score dev after every epoch and keep the best epoch's weights (when there "
                                       "is a dev split; ties go to the later epoch)")
    do_predict: bool = option(True, "predict the test split and write metrics.json + predictions")
    test_holdout: float = option(0.1, "when the task has no test split: this fraction of train (seeded by --seed; RE: "
                                      "stratified by label) is held out as the test set; 0 = report no test score")
    max_seq_len: int = option(128, "subword tokens per model input, [CLS] and [SEP] included",
                              aliases=["--max_seq_length"])
    batch_size: int = option(32, "training examples per optimizer step, per device",
                             aliases=["--per_device_train_batch_size"])
    eval_batch_size: int = option(64, "examples per forward pass when predicting", aliases=["--per_device_eval_batch_size"])
    learning_rate: float = option(5e-5, "peak learning rate of AdamW (linear warmup, then linear decay to 0)",
                                  aliases=["--lr"])
    epochs: float = option(3.0, "passes over the training data (fractions allowed)", aliases=["--num_train_epochs"])
    warmup_ratio: float = option(0.1, "fraction of the optimizer steps spent warming the learning rate up from 0")
    weight_decay: float = option(0.01, "AdamW weight decay on weight matrices (never on biases and LayerNorm)")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(42, "seed of initialisation, data order, dropout and subsampling")
    max_train_examples: int | None = option(None, "use a seeded random subset of this many training examples")
    max_eval_examples: int | None = option(None, "use a seeded random subset of this many dev/test examples")
    num_threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    bucket_by_length: bool = option(True, "batch examples of similar length (less padding, faster); pools stay small "
                                          "enough that batches still change between epochs")
    progress: bool = option(True, "progress bars and a line per epoch")
    save_model: bool = option(True, "write the fine-tuned model to OUTPUT_DIR/model")
    bf16: bool = option(False, "bfloat16 autocast (under the deepspeed launcher: DeepSpeed's bf16 engine)")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON for runs under a launcher (default: generated "
                                                "from these settings and --zero-stage)")
    zero_stage: int = option(0, "ZeRO stage under a launcher when no --deepspeed-config is given", choices=(0, 1, 2))
    report_to: list[str] = option(factory=lambda: ["tensorboard"], choices=tracking.BACKENDS,
                                  help="where per-step loss/lr and dev scores go: tensorboard (OUTPUT_DIR/tensorboard), "
                                       "mlflow, wandb (several at once), or none; mlflow and wandb are optional installs")
    project: str = option("biobert-finetuning", "MLflow experiment / W&B project")
    run_name: str | None = option(None, "MLflow / W&B run name (default: TASK:OUTPUT_DIR's name)")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file store "
                                            "in OUTPUT_DIR/mlruns)")

    def __post_init__(self) -> None:
        check_choices(self)
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
        if self.adam_epsilon <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("adam_epsilon must be > 0, weight_decay and max_grad_norm >= 0")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError("zero_stage must be 0, 1 or 2 (fine-tuned models are small; ZeRO-3 is not needed)")
        if not 0 <= self.test_holdout < 1:
            raise ValueError(f"test_holdout must be in [0, 1), got {self.test_holdout}")
        tracking.resolve(self.report_to, key="--report-to")
        if not (self.do_train or self.do_eval or self.do_predict):
            raise ValueError("nothing to do: give at least one of --do-train/--do-eval/--do-predict")

    def output_path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)


_CLASSIFIER_BIAS_HELP = ("a fresh classifier's starting bias: prior (log of the training labels' frequencies, so a rare "
                         "class is not first pushed away) or zero (BERT's and HF's init)")


@dataclass(kw_only=True)
class NERConfig(FinetuneConfig):
    """Named entity recognition: token-per-line files, entity-level P/R/F1 (conlleval)."""

    task: ClassVar[str] = "ner"
    tag_scheme: str = option("auto", "tag scheme of the input files (training uses IOB2 internally)",
                             choices=("auto", "iob1", "iob2", "iobes"))
    window_overlap: int = option(32, "subword tokens shared by consecutive windows of a sentence longer than "
                                     "max_seq_len")
    epochs: float = option(5.0, "passes over the training data (fractions allowed)", aliases=["--num_train_epochs"])
    # No warmup for NER in the quick recipe: on a short schedule a 10% warmup delays the escape from the all-"O"
    # solution of a sparse entity type into the steps where the decaying learning rate is small (finetuning/README.md).
    # RE and QA keep BERT's 10%: without it a short run at a high rate can end on the majority class.
    warmup_ratio: float = option(0.0, "fraction of the optimizer steps spent warming the learning rate up from 0")
    classifier_bias: str = option("prior", _CLASSIFIER_BIAS_HELP, choices=("prior", "zero"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.window_overlap <= (self.max_seq_len - 2) // 2:
            raise ValueError(f"window_overlap must be in [0, {(self.max_seq_len - 2) // 2}] for this max_seq_len")


@dataclass(kw_only=True)
class REConfig(FinetuneConfig):
    """Relation extraction: sentence classification, positive-class (binary) or micro (multi-class) P/R/F1."""

    task: ClassVar[str] = "re"
    cv_folds: int = option(0, "> 1: stratified k-fold cross-validation over train (+dev) instead of the test split")
    negative_label: str | None = option(None, "the negative class (default: '0' for 0/1 data, 'false' when present, "
                                              "else none)")
    save_fold_models: bool = option(False, "with --cv-folds, also save each fold's model")
    classifier_bias: str = option("prior", _CLASSIFIER_BIAS_HELP, choices=("prior", "zero"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds must be 0 (no CV) or >= 2, got {self.cv_folds}")


@dataclass(kw_only=True)
class QAConfig(FinetuneConfig):
    """Factoid question answering (BioASQ in SQuAD format): strict/lenient accuracy and MRR over the top 5."""

    task: ClassVar[str] = "qa"
    max_seq_len: int = option(384, "subword tokens per window (question + context)", aliases=["--max_seq_length"])
    doc_stride: int = option(128, "context tokens between the starts of neighbouring windows of a long snippet")
    max_query_len: int = option(64, "question tokens kept")
    max_answer_len: int = option(30, "longest answer considered, in subword tokens")
    n_best: int = option(20, "candidate spans kept per snippet")
    top_k: int = option(5, "answers per question (BioASQ allows 5)")
    batch_size: int = option(24, "training windows per optimizer step, per device",
                             aliases=["--per_device_train_batch_size"])
    learning_rate: float = option(5e-6, "peak learning rate of AdamW", aliases=["--lr"])
    epochs: float = option(3.0, "passes over the training data", aliases=["--num_train_epochs"])
    test_holdout: float = option(0.2, "when the data has no test file: this fraction of the train questions is held "
                                      "out as the test set (seeded by --seed); 0 = report no test score",
                                 aliases=["--holdout-fraction"])
    eval_snippets_per_question: int | None = option(None, "limit the snippets scored per question")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_query_len + 8 >= self.max_seq_len:
            raise ValueError("max_query_len must leave room for the context in max_seq_len")
        if not 0 < self.doc_stride < self.max_seq_len - self.max_query_len - 3:
            raise ValueError("doc_stride (tokens shared by neighbouring windows) must be in (0, max_seq_len - "
                             "max_query_len - 3): each window must move forward")


TASK_CONFIGS = {"ner": NERConfig, "re": REConfig, "qa": QAConfig}
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


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")


def build_task(cls: type[_Cfg], values: dict, where: str = "") -> _Cfg:
    """``cls`` from raw values (strings from a suite's pass-through flags allowed) over their recipe's values."""
    recipe = values.get("recipe", "quick")
    _check_recipe(recipe)
    return build(cls, {**RECIPES[recipe].get(cls.task, {}), **values}, where or cls.task)


def recipe_in(argv: list[str]) -> str:
    """The recipe named on a command line (``--recipe X``, ``--recipe=X`` or ``recipe=X``), else in its ``--config``
    file, else "quick": it decides the values the other settings are laid over, so it is read before the full parse."""
    recipe, config_file = None, None
    for i, item in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if item == "--recipe":
            recipe = value
        elif item.startswith(("--recipe=", "recipe=")):
            recipe = item.split("=", 1)[1]
        elif item == "--config":
            config_file = value
        elif item.startswith("--config="):
            config_file = item.split("=", 1)[1]
    if recipe is None and config_file:
        recipe = read_file(config_file).get("recipe")
    recipe = recipe or "quick"
    _check_recipe(recipe)
    return recipe


def parse_task(cls: type[_Cfg], argv: list[str] | None = None, *, prog: str, description: str = "") -> _Cfg:
    """A task's command line on top of its recipe (``--recipe``, default quick) on top of the field defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = recipe_in(argv)
    for name, per_task in RECIPES.items():
        if per_task.get(cls.task):
            values = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in per_task[cls.task].items())
            description = f"{description}\n\n--recipe {name} sets: {values}"
    return parse(cls, argv, prog=prog, description=description, base={**RECIPES[recipe].get(cls.task, {}),
                                                                         "recipe": recipe})


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
