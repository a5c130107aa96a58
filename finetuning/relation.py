"""Relation extraction fine-tuning: ``biobert re --model DIR --data DIR --output-dir OUT [--cv-folds 10]``.

DATA holds train/dev/test as BioBERT TSV or marker JSONL. Binary tasks score the positive class, multi-class ones
the micro average over classes except the negative one. Without a test split, ``--cv-folds K`` runs stratified
K-fold cross-validation over train (+dev): OUT/folds.json, OUT/fold_K/{train,test}.tsv, per-fold metrics, mean +- std;
otherwise a seeded, label-stratified part of train is held out as the test set (``--test-holdout``, named in
metrics.json "test_source"; 0: no test score). The headline P/R/F1 is never a dev score. Predictions:
OUT/{dev,test}_predictions.tsv with the gold label beside the prediction.
"""

from __future__ import annotations

import os
import statistics
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
from finetuning.config import REConfig, parse_task, to_dict
from finetuning.heads import BertForSequenceClassification, has_classifier_for, load_head, resolve_model, set_prior_bias
from finetuning.metrics import classification_scores
from finetuning.relation_data import (
    REExample,
    check_labels,
    default_negative,
    label_set,
    read_re_file,
    stratified_folds,
    to_tsv,
)
from finetuning.trainer import Runtime, fit, predict, setup_runtime

EXTS = (".tsv", ".jsonl", ".json", ".txt")
SCORE_KEYS = ("precision", "recall", "f1")


class RETask:
    def __init__(self, cfg: REConfig, tokenizer, labels: list[str], negative: str | None):
        self.cfg, self.tokenizer, self.labels, self.negative = cfg, tokenizer, labels, negative
        self.label2id = {lab: i for i, lab in enumerate(labels)}

    def features(self, examples: list[REExample]) -> list[dict]:
        enc = self.tokenizer([e.text for e in examples], truncation=True, max_length=self.cfg.max_seq_len)
        return [{"input_ids": ids, "labels": self.label2id.get(e.label, -100)} for ids, e in zip(enc["input_ids"], examples)]

    def evaluate(self, model, examples: list[REExample], rt: Runtime) -> tuple[dict, list[str]]:
        logits = predict(model, self.features(examples), self.cfg, rt, keys=["logits"], per_token=False)["logits"]
        pred = [self.labels[int(np.argmax(x))] for x in logits]
        return classification_scores([e.label for e in examples], pred, self.negative), pred


def _predictions_tsv(examples: list[REExample], pred: list[str]) -> str:
    """One row per example: where it is in its file, the gold label, the prediction, the sentence."""
    rows = ["index\tline\tgold\tprediction\tsentence"] + [
        f"{e.guid}\t{e.line}\t{e.label}\t{p}\t{' '.join(e.text.split())}" for e, p in zip(examples, pred)]
    return "\n".join(rows) + "\n"


def run_split(cfg: REConfig, rt: Runtime, task: RETask, model_dir, train, dev, test, out_dir: str, save_model: bool):
    """Fine-tune on ``train`` (select on ``dev`` if given), score dev/test, write predictions (+ model) to out_dir."""
    model = load_head(model_dir, BertForSequenceClassification, task.labels)
    result: dict = {}
    if train is not None:
        evaluate = (lambda m: task.evaluate(m, dev, rt)[0]) if dev and cfg.do_eval and cfg.select_on_dev else None
        feats = task.features(train)
        if cfg.classifier_bias == "prior" and not has_classifier_for(model_dir, task.labels):
            result["classifier_prior"] = set_prior_bias(model.classifier, (f["labels"] for f in feats))
        result["train"] = fit(model, feats, cfg, rt, evaluate, select="f1", desc="re", out_dir=out_dir)
    model.to(rt.device)
    for name, examples, wanted in (("dev", dev, cfg.do_eval), ("test", test, cfg.do_predict)):
        if examples and wanted:
            result[name], pred = task.evaluate(model, examples, rt)
            if train is not None and "collapsed" not in result and len(examples) > 1:
                # The first scored split (dev when there is one): one class for every example is a model that has
                # not left the majority-class solution.
                result["collapsed"] = len(set(pred)) == 1
                if result["collapsed"]:
                    result["warnings"] = [no_learning_warning(f"every example predicted {pred[0]!r}", name, cfg)]
                    if rt.is_main:
                        print(result["warnings"][0], file=sys.stderr, flush=True)
            if rt.is_main:
                atomic_write(os.path.join(out_dir, f"{name}_predictions.tsv"), _predictions_tsv(examples, pred))
    if rt.is_main and save_model and train is not None:
        from pretraining.model import save_pretrained

        save_pretrained(model, os.path.join(out_dir, "model"), tokenizer_dir=model_dir)
    final = result.get("test") or {}  # a dev score (it also chose the epoch) is never the headline
    result.update({k: final[k] for k in (*SCORE_KEYS, "accuracy") if k in final})
    return result


def _read(path, cfg: REConfig, limit: int | None) -> list[REExample] | None:
    return None if path is None else subsample(read_re_file(path), limit, cfg.seed)


def main(cfg: REConfig) -> dict:
    rt = setup_runtime(cfg)
    data = require_data_dir(cfg.data)
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    paths = {s: find_split(data, s, EXTS) for s in ("train", "dev", "test")}
    if paths["train"] is None and (cfg.do_train or cfg.cv_folds):
        raise UserError(f"{data}: no train file ({'/'.join(EXTS)})")
    full_train = read_re_file(paths["train"]) if paths["train"] else None
    dev = _read(paths["dev"], cfg, cfg.max_eval_examples)
    test = _read(paths["test"], cfg, cfg.max_eval_examples) if cfg.do_predict else None
    test_source = str(paths["test"]) if test else None
    pool = full_train
    if test is None and cfg.do_predict and not cfg.cv_folds and cfg.test_holdout > 0 and full_train:
        pool, held = split_off_test(full_train, cfg.test_holdout, cfg.seed, labels=[e.label for e in full_train])
        test = subsample(held, cfg.max_eval_examples, cfg.seed)
        test_source = held_out_source(paths["train"], cfg.test_holdout, cfg.seed, "examples", stratified=True)
    train = subsample(pool, cfg.max_train_examples, cfg.seed) if pool else None
    if full_train is not None:
        labels = label_set(full_train)  # from the whole file: a subsample may miss a rare class
    else:
        labels = trained_labels(model_dir, "classifier.weight", "relation classification",
                                lambda labels: not all(lab.startswith("LABEL_") for lab in labels))
    for split, examples in (("dev", dev), ("test", test)):
        if examples:
            check_labels(examples, labels, paths[split])
    negative = cfg.negative_label if cfg.negative_label is not None else default_negative(labels)
    task = RETask(cfg, tokenizer, labels, negative)
    metrics: dict = {"task": "re", "labels": labels, "negative_label": negative, "test_source": test_source}

    if cfg.cv_folds:
        pool = train + (dev or [])
        folds = stratified_folds([e.label for e in pool], cfg.cv_folds, cfg.seed)
        if rt.is_main:
            atomic_write_json(cfg.output_path("folds.json"), {
                "k": cfg.cv_folds, "seed": cfg.seed,
                "examples": [{"file": str(paths["train"] if i < len(train) else paths["dev"]), "line": e.line,
                              "fold": f} for i, (e, f) in enumerate(zip(pool, folds))],
            })
        per_fold = []
        for k in range(cfg.cv_folds):
            fold_train = [e for e, f in zip(pool, folds) if f != k]
            fold_test = [e for e, f in zip(pool, folds) if f == k]
            out = cfg.output_path(f"fold_{k}")
            if rt.is_main:
                atomic_write(os.path.join(out, "train.tsv"), to_tsv(fold_train))
                atomic_write(os.path.join(out, "test.tsv"), to_tsv(fold_test))
            fold_cfg = cfg if cfg.do_predict else REConfig(**{**to_dict(cfg), "do_predict": True})
            result = run_split(fold_cfg, rt, task, model_dir, fold_train, None, fold_test, out, cfg.save_fold_models)
            result["fold"] = k
            per_fold.append(result)
            if rt.is_main:
                atomic_write_json(os.path.join(out, "metrics.json"), result)
                print(results_line(f"re fold {k}", result, SCORE_KEYS))
        metrics["folds"] = per_fold
        metrics["test_source"] = f"{cfg.cv_folds}-fold stratified cross-validation over train (+dev), seed {cfg.seed}"
        metrics["collapsed"] = any(r.get("collapsed") for r in per_fold)
        if metrics["collapsed"]:
            metrics["warnings"] = [f"fold {r['fold']}: {w}" for r in per_fold for w in r.get("warnings", [])]
        for key in SCORE_KEYS:
            values = [r[key] for r in per_fold]
            metrics[key] = statistics.fmean(values)
            metrics[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    else:
        metrics.update(run_split(cfg, rt, task, model_dir, train if cfg.do_train else None, dev, test,
                                 cfg.output_dir, cfg.save_model))
        if "test" not in metrics and cfg.do_predict:
            metrics["no_test_score"] = no_test_note(data)
    metrics["config"] = to_dict(cfg)
    if rt.is_main:
        atomic_write_json(cfg.output_path("metrics.json"), metrics)
        print(results_line("re", metrics, SCORE_KEYS) + (
            f" (mean of {cfg.cv_folds} folds, f1 std {metrics['f1_std']:.4f})" if cfg.cv_folds else ""))
    return metrics


def cli(argv: list[str] | None = None) -> int:
    main(parse_task(REConfig, argv, prog="biobert re", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
