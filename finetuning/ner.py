"""Biomedical NER fine-tuning: ``biobert ner --model DIR --data DIR --output-dir OUT``.

DATA holds train/devel/test .tsv (token<TAB>label or CoNLL columns). Writes OUT/metrics.json (test entity P/R/F1
with conlleval semantics, per type; dev scores under "dev"; the headline P/R/F1 only ever from a test set: the test
file, or without one a seeded held-out part of train (--test-holdout), named in "test_source"),
OUT/{dev,test}_predictions.tsv (`token ... gold pred`, conlleval's layout) and the fine-tuned model OUT/model.
"""

from __future__ import annotations

import sys

import numpy as np

from biobert.errors import UserError, run
from biobert.files import atomic_write, atomic_write_json
from finetuning.common import (
    find_split,
    held_out_source,
    load_tokenizer,
    no_learning_warning,
    no_test_note,
    require_data_dir,
    results_line,
    split_off_test,
    subsample,
    trained_labels,
)
from finetuning.config import NERConfig, parse_task, to_dict
from finetuning.heads import BertForTokenClassification, has_classifier_for, load_head, resolve_model, set_prior_bias
from finetuning.metrics import ner_scores
from finetuning.ner_data import TAG_PATTERN, NERFile, conll_text, convert_tags, encode_sentences, label_list, read_conll
from finetuning.trainer import fit, predict, setup_runtime

EXTS = (".tsv", ".txt", ".conll", ".iob", ".iob2")


class NERTask:
    """Featurises NER files for one tokenizer/label set and turns model outputs back into per-token tags."""

    def __init__(self, cfg: NERConfig, tokenizer, labels: list[str]):
        self.cfg, self.tokenizer, self.labels = cfg, tokenizer, labels
        self.label2id = {lab: i for i, lab in enumerate(labels)}

    def check_types(self, f: NERFile) -> None:
        known = {lab[2:] for lab in self.labels if lab != "O"}
        for s in f.sentences:
            for i, t in enumerate(s.tags):
                if t != "O" and t[2:] not in known:
                    raise ValueError(f"{f.path}:{s.first_line + i}: entity type {t[2:]!r} is not in the training "
                                     f"data / model labels {sorted(known)}")

    def features(self, f: NERFile, with_labels: bool):
        gold = [convert_tags(s.tags, "iob2") for s in f.sentences] if with_labels else None
        enc = encode_sentences([s.tokens for s in f.sentences], gold, self.tokenizer, self.label2id,
                               self.cfg.max_seq_len, self.cfg.window_overlap)
        feats = [{"input_ids": ids, "labels": lab} for ids, lab in zip(enc.input_ids, enc.labels)]
        return feats, enc.targets

    def predict_tags(self, model, f: NERFile, rt) -> list[list[str]]:
        feats, targets = self.features(f, with_labels=False)
        logits = predict(model, feats, self.cfg, rt, keys=["logits"], per_token=True)["logits"]
        best = [np.argmax(x, axis=-1) for x in logits]
        return [[self.labels[int(best[fi][pos])] for fi, pos in sent] for sent in targets]

    def evaluate(self, model, f: NERFile, rt) -> tuple[dict, list[list[str]]]:
        pred = self.predict_tags(model, f, rt)
        return ner_scores([convert_tags(s.tags, "iob2") for s in f.sentences], pred), pred


def _read(path, cfg: NERConfig, limit: int | None) -> NERFile | None:
    if path is None:
        return None
    f = read_conll(path, cfg.tag_scheme)
    f.all_labels = label_list([f])  # from the whole file: a subsample may miss a rare type
    f.sentences = subsample(f.sentences, limit, cfg.seed)
    return f


def _test_from_train(train: NERFile, cfg: NERConfig) -> NERFile:
    """Hold out a seeded part of train's sentences as the test set (before any subsampling of train)."""
    train.sentences, held = split_off_test(train.sentences, cfg.test_holdout, cfg.seed)
    test = NERFile(held_out_source(train.path, cfg.test_holdout, cfg.seed, "sentences"), held, train.scheme,
                   all_labels=train.all_labels)
    test.sentences = subsample(test.sentences, cfg.max_eval_examples, cfg.seed)
    return test


def main(cfg: NERConfig) -> dict:
    rt = setup_runtime(cfg)
    data = require_data_dir(cfg.data)
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    test_path = find_split(data, "test", EXTS)
    held_out = test_path is None and cfg.do_predict and cfg.test_holdout > 0
    train = _read(find_split(data, "train", EXTS), cfg, None) if cfg.do_train or held_out else None
    dev = _read(find_split(data, "dev", EXTS), cfg, cfg.max_eval_examples)
    test = _read(test_path, cfg, cfg.max_eval_examples) if cfg.do_predict else None
    if held_out and train is not None:
        test = _test_from_train(train, cfg)
    if train is not None:
        train.sentences = subsample(train.sentences, cfg.max_train_examples, cfg.seed)
        if not cfg.do_train:
            train = None
    if cfg.do_train and train is None:
        raise UserError(f"{data}: no train file ({', '.join('train' + e for e in EXTS)}) for --do-train")
    if train is not None:
        labels = train.all_labels
    else:  # evaluating an already fine-tuned model: its config carries the label set
        labels = trained_labels(model_dir, "classifier.weight", "NER",
                                lambda labels: "O" in labels and all(TAG_PATTERN.match(lab) for lab in labels))
    task = NERTask(cfg, tokenizer, labels)
    for f in (dev, test):
        if f is not None:
            task.check_types(f)
    model = load_head(model_dir, BertForTokenClassification, labels)

    metrics: dict = {"task": "ner", "labels": labels,
                     "test_source": test.path if test is not None else None}
    if cfg.do_train:
        feats, _ = task.features(train, with_labels=True)
        if cfg.classifier_bias == "prior" and not has_classifier_for(model_dir, labels):
            metrics["classifier_prior"] = set_prior_bias(model.classifier, (i for f in feats for i in f["labels"]))
        use_dev = dev is not None and cfg.do_eval and cfg.select_on_dev
        metrics["train"] = fit(model, feats, cfg, rt, (lambda m: task.evaluate(m, dev, rt)[0]) if use_dev else None,
                               select="f1", desc="ner")
    model.to(rt.device)
    for name, f, wanted in (("dev", dev, cfg.do_eval), ("test", test, cfg.do_predict)):
        if f is None or not wanted:
            continue
        scores, pred = task.evaluate(model, f, rt)
        metrics[name] = scores
        if rt.is_main:
            atomic_write(cfg.output_path(f"{name}_predictions.tsv"), conll_text(f, pred))
    final = metrics.get("test") or {}  # a dev score (it also chose the epoch) is never the headline
    metrics.update({k: final[k] for k in ("precision", "recall", "f1", "per_type") if k in final})
    if "test" not in metrics and cfg.do_predict:
        metrics["no_test_score"] = no_test_note(data)
    checked = "dev" if "dev" in metrics else "test" if "test" in metrics else None
    if cfg.do_train and checked:
        # A sparse entity type at a short schedule can end with every token "O": say so instead of a silent F1 of 0.
        metrics["collapsed"] = metrics[checked]["n_pred_entities"] == 0
        if metrics["collapsed"]:
            metrics["warnings"] = [no_learning_warning("no entity predicted", checked, cfg)]
            if rt.is_main:
                print(metrics["warnings"][0], file=sys.stderr, flush=True)
    metrics["config"] = to_dict(cfg)
    if rt.is_main:
        if cfg.do_train and cfg.save_model:
            from pretraining.model import save_pretrained

            save_pretrained(model, cfg.output_path("model"), tokenizer_dir=model_dir)
        atomic_write_json(cfg.output_path("metrics.json"), metrics)
        print(results_line("ner", metrics, ("precision", "recall", "f1")))
    return metrics


def cli(argv: list[str] | None = None) -> int:
    main(parse_task(NERConfig, argv, prog="biobert ner", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
