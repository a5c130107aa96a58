"""Task heads on the shared encoder (pretraining.model.BertModel as ``.bert``), with HF's parameter names.

A saved head is an ordinary HF directory: ``bert.*`` + ``classifier.*`` (token / sequence classification) or
``qa_outputs.*`` (QA), config.json with ``id2label``/``label2id`` and ``architectures`` set, so
``transformers.AutoModelFor...`` loads it too. Each forward returns {"logits"...} and "loss" when labels are given.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from pretraining.model import BertModel, init_weights, load_pretrained


class _Head(nn.Module):
    """The shared encoder as ``.bert`` plus one linear output layer ``<out_name>`` (BERT's init), HF's names."""

    hf_architecture = ""

    def __init__(self, config: BertConfig, out_name: str, out_features: int, dropout: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        if dropout:
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
        setattr(self, out_name, nn.Linear(config.hidden_size, out_features))
        init_weights(getattr(self, out_name), config)


class BertForTokenClassification(_Head):
    hf_architecture = "BertForTokenClassification"

    def __init__(self, config: BertConfig):
        super().__init__(config, "classifier", config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> dict:
        sequence, _ = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(sequence))
        out = {"logits": logits}
        if labels is not None:
            # The mean over labelled tokens, 0 (not NaN) for a batch without any.
            total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
            out["loss"] = total / (labels != -100).sum().clamp(min=1)
        return out


class BertForSequenceClassification(_Head):
    hf_architecture = "BertForSequenceClassification"

    def __init__(self, config: BertConfig):
        super().__init__(config, "classifier", config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> dict:
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


class BertForQuestionAnswering(_Head):
    hf_architecture = "BertForQuestionAnswering"

    def __init__(self, config: BertConfig):
        super().__init__(config, "qa_outputs", 2, dropout=False)  # as HF: no dropout before the span head

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None):
        sequence, _ = self.bert(input_ids, token_type_ids, attention_mask)
        start, end = self.qa_outputs(sequence).float().unbind(-1)
        if attention_mask is not None:  # padding can never be an answer boundary
            start = start.masked_fill(attention_mask == 0, -1e4)
            end = end.masked_fill(attention_mask == 0, -1e4)
        out = {"start_logits": start, "end_logits": end}
        if start_positions is not None and end_positions is not None:
            out["loss"] = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return out


def resolve_model(spec: str | Path) -> Path:
    """A model spec ("minilm", a directory, a URL) -> an HF directory, via pretraining.hub."""
    if Path(spec).is_dir():
        return Path(spec)
    from pretraining.hub import resolve_model_dir

    return Path(resolve_model_dir(str(spec)))


def checkpoint_keys(model_dir: str | Path) -> set[str]:
    """Parameter names stored in an HF dir, without loading the tensors (to tell e.g. a QA-fine-tuned dir)."""
    model_dir = Path(model_dir)
    st = model_dir / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return set(f.keys())
    pt = model_dir / "pytorch_model.bin"
    if pt.is_file():
        return set(torch.load(pt, map_location="cpu", weights_only=True).keys())
    return set()


def _saved_labels_are(model_dir: str | Path, labels: list[str]) -> bool:
    config = BertConfig.from_json_file(str(Path(model_dir) / "config.json"))
    return [config.id2label.get(i) for i in range(len(config.id2label))] == list(labels)


def has_classifier_for(model_dir: str | Path, labels: list[str]) -> bool:
    """Whether ``model_dir`` holds a trained classifier for exactly these classes in this order."""
    return "classifier.weight" in checkpoint_keys(model_dir) and _saved_labels_are(model_dir, labels)


def load_head(model_dir: str | Path, head_cls: type[nn.Module], labels: list[str] | None = None) -> nn.Module:
    """The encoder (and the head, when the dir has one of the same shape) from ``model_dir``; new heads are initialised.

    ``labels``: the classifier's classes in id order (written to config.json as id2label/label2id).
    """
    overrides = {}
    if labels is not None:
        overrides = {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}
        if "classifier.weight" in checkpoint_keys(model_dir) and not _saved_labels_are(model_dir, labels):
            # A classifier fine-tuned on another label set would be a shape mismatch: start it afresh instead.
            return _load_without(model_dir, head_cls, overrides, prefix="classifier.")
    return load_pretrained(model_dir, model_cls=head_cls, **overrides)


def set_prior_bias(classifier: nn.Linear, label_ids) -> list[float]:
    """Start a fresh classifier at the training labels' prior: bias = log p(class), add-one smoothed.

    With BERT's small weight init the logits are then the prior for every input, so the summed gradient on the bias is
    zero and the first steps learn what tells the classes apart. From zero (uniform) logits on a sparse NER set the
    first steps instead push every token towards "O" -- the common-mode part of the gradient (98% of the labelled
    tokens on a set with 12% entity sentences) also flows into the encoder -- and the run must climb back out of that all-"O" basin before it predicts an entity
    (finetuning/README.md, "Low-resource runs"). Returns the prior.
    """
    ids = torch.as_tensor([i for i in label_ids if i >= 0], dtype=torch.long)
    counts = torch.bincount(ids, minlength=classifier.out_features).double() + 1.0
    prior = counts / counts.sum()
    with torch.no_grad():
        classifier.bias.copy_(prior.log().to(classifier.bias.dtype))
    return prior.tolist()


def _load_without(model_dir, head_cls, overrides, prefix: str) -> nn.Module:
    from pretraining.model import _read_weights, load_state_dict_into

    config = BertConfig.from_json_file(str(Path(model_dir) / "config.json"))
    for key, value in overrides.items():
        setattr(config, key, value)
    model = head_cls(config)
    state_dict, path = _read_weights(Path(model_dir))
    load_state_dict_into(model, {k: v for k, v in state_dict.items() if not k.startswith(prefix)}, str(path))
    return model.eval()
