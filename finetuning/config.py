"""Typed fine-tuning configs, validated on construction; every field is a flag of `biobert ner|re|qa` (biobert.config).

The defaults are the quick recipe: settings that learn in minutes on a CPU with the packaged MiniLM. The HF
TrainingArguments spellings (``--learning_rate``, ``--num_train_epochs``, ``--per_device_train_batch_size``,
``--output_dir``, ``--model_name_or_path``...) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from biobert import tracking
from biobert.config import check_choices, option


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning settings shared by NER, RE and QA."""

    model: str = option("minilm", "HF BERT directory, http(s) URL, or 'minilm' (the packaged MiniLM-L6)",
                        aliases=["--model_name_or_path"])
    data: str = option(help="task directory with the train/dev/test files")
    output_dir: str = option("finetune_out", "where metrics.json, the predictions and the fine-tuned model go")
    do_train: bool = option(True, "fine-tune on the train split")
    do_eval: bool = option(True, "score the dev split and write dev metrics")
    select_on_dev: bool = option(True, "score dev after every epoch and keep the best epoch's weights (when there "
                                       "is a dev split)")
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
    bucket_by_length: bool = option(True, "sort examples by length within shuffled pools so that batches pad little")
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


@dataclass(kw_only=True)
class NERConfig(FinetuneConfig):
    """Named entity recognition: token-per-line files, entity-level P/R/F1 (conlleval)."""

    tag_scheme: str = option("auto", "tag scheme of the input files (training uses IOB2 internally)",
                             choices=("auto", "iob1", "iob2", "iobes"))
    window_overlap: int = option(32, "subword tokens shared by consecutive windows of a sentence longer than "
                                     "max_seq_len")
    epochs: float = option(5.0, "passes over the training data (fractions allowed)", aliases=["--num_train_epochs"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.window_overlap <= (self.max_seq_len - 2) // 2:
            raise ValueError(f"window_overlap must be in [0, {(self.max_seq_len - 2) // 2}] for this max_seq_len")


@dataclass(kw_only=True)
class REConfig(FinetuneConfig):
    """Relation extraction: sentence classification, positive-class (binary) or micro (multi-class) P/R/F1."""

    cv_folds: int = option(0, "> 1: stratified k-fold cross-validation over train (+dev) instead of the test split")
    negative_label: str | None = option(None, "the negative class (default: '0' for 0/1 data, 'false' when present, "
                                              "else none)")
    save_fold_models: bool = option(False, "with --cv-folds, also save each fold's model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds must be 0 (no CV) or >= 2, got {self.cv_folds}")


@dataclass(kw_only=True)
class QAConfig(FinetuneConfig):
    """Factoid question answering (BioASQ in SQuAD format): strict/lenient accuracy and MRR over the top 5."""

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


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def default_of(cls, name: str):
    """A field's default (for scripts that need e.g. a task's default learning rate without a full config)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
