"""Evaluation that reads like the paper: test splits (never a dev score as the headline), predictions with the gold
label beside them (conlleval's layout), and the suite's table in the paper's layout."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from finetuning.common import headline, results_line, split_off_test
from finetuning.config import NERConfig, REConfig
from finetuning.ner_data import read_conll

TINY = dict(max_seq_len=64, window_overlap=16, batch_size=16, eval_batch_size=64, progress=False, num_threads=2, seed=3, epochs=1,
            learning_rate=2e-4, save_model=False)


def test_split_off_test_is_seeded_stratified_and_disjoint():
    items = list(range(100))
    labels = ["a"] * 80 + ["b"] * 20
    kept, held = split_off_test(items, 0.1, seed=1, labels=labels)
    assert sorted(kept + held) == items and len(held) == 10
    assert sum(labels[i] == "b" for i in held) == 2  # 10% of each class
    assert held == sorted(held) and split_off_test(items, 0.1, 1, labels) == (kept, held)
    assert split_off_test(items, 0.1, 2, labels)[1] != held
    assert len(split_off_test(items[:3], 0.1, 1)[1]) == 1  # at least one


@pytest.fixture
def ner_without_test(shared_data, tmp_path):
    """NCBI-disease's train and dev (subsets), no test file: the shape of a task without a test split."""
    src = shared_data / "ner/NCBI-disease-IOB"
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train.tsv", 300), ("devel.tsv", 20)):
        blocks = (src / name).read_text().split("\n\n")[:n]
        (data / name).write_text("\n\n".join(blocks) + "\n")
    return data


def test_ner_without_test_split_takes_its_test_from_train(ner_without_test, minilm_dir, tmp_path):
    from finetuning.ner import main

    m = main(NERConfig(model=str(minilm_dir), data=str(ner_without_test), output_dir=str(tmp_path / "out"),
                       max_train_examples=64, **TINY))
    assert m["test_source"] == "train.tsv: 10% of its sentences held out as test (seed 3); train is the rest"
    assert m["f1"] == m["test"]["f1"] and m["dev"]  # the headline is the held-out test, dev stays under "dev"
    curve = m["train"]["curve"]  # the loss curve, not just per-epoch numbers
    assert [c["step"] for c in curve] == list(range(1, m["train"]["steps"] + 1)) and all(c["lr"] >= 0 for c in curve)
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["train"]["curve"] == curve and saved["test_source"] == m["test_source"]
    sentences = read_conll(ner_without_test / "train.tsv").sentences
    _, held = split_off_test(sentences, 0.1, 3)
    written = [blk.split("\n") for blk in (tmp_path / "out/test_predictions.tsv").read_text().strip().split("\n\n")]
    assert [[ln.split(" ")[0] for ln in blk] for blk in written] == [s.tokens for s in held]
    assert [[ln.split(" ")[1] for ln in blk] for blk in written] == [s.tags for s in held]

    none = main(NERConfig(model=str(minilm_dir), data=str(ner_without_test), output_dir=str(tmp_path / "none"),
                          max_train_examples=32, test_holdout=0, **TINY))
    assert "f1" not in none and "test" not in none and "no test score" in none["no_test_score"]
    assert "dev only" in results_line("ner", none, ("precision", "recall", "f1"))
    assert headline(none, ("precision", "recall", "f1"))[1] == "dev"


@pytest.mark.skipif(not os.environ.get("CONLLEVAL"), reason="set CONLLEVAL to a conlleval.pl to run it on our files")
def test_conlleval_scores_our_prediction_file_as_we_do(ner_without_test, minilm_dir, tmp_path):
    from finetuning.ner import main

    m = main(NERConfig(model=str(minilm_dir), data=str(ner_without_test), output_dir=str(tmp_path),
                       max_train_examples=200, **{**TINY, "epochs": 2}))
    with open(tmp_path / "test_predictions.tsv", "rb") as f:
        out = subprocess.run(["perl", os.environ["CONLLEVAL"]], stdin=f, capture_output=True, text=True, check=True)
    fb1 = float(out.stdout.split("FB1:")[1].split()[0])
    assert m["f1"] > 0.1 and fb1 == pytest.approx(100 * m["f1"], abs=0.006), out.stdout


def test_re_without_test_split_holds_out_stratified_train(shared_data, minilm_dir, tmp_path):
    from finetuning.relation import main

    src = shared_data / "re/ChemProt"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join((src / "train.jsonl").read_text().splitlines(True)[:150]))
    (data / "dev.jsonl").write_text("".join((src / "dev.jsonl").read_text().splitlines(True)[:20]))
    m = main(REConfig(model=str(minilm_dir), data=str(data), output_dir=str(tmp_path / "out"),
                      **{k: v for k, v in TINY.items() if k != "window_overlap"}))
    assert m["test_source"] == ("train.jsonl: 10% of its examples held out as test (seed 3, stratified by label); "
                                "train is the rest")
    from finetuning.relation_data import read_re_file

    train = read_re_file(data / "train.jsonl")
    kept, held = split_off_test(train, 0.1, 3, labels=[e.label for e in train])
    rows = [r.split("\t") for r in (tmp_path / "out/test_predictions.tsv").read_text().splitlines()]
    assert rows[0] == ["index", "line", "gold", "prediction", "sentence"]
    assert [(int(r[1]), r[2]) for r in rows[1:]] == [(e.line, e.label) for e in held]
    assert m["f1"] == m["test"]["f1"] and m["train"]["train_examples_seen"] == len(kept)


def _row(task, kind, split="test", **scores):
    return {"task": task, "kind": kind, "seconds": 60, "train_examples_per_s": 10.0, "split": split,
            "test_source": "test.tsv" if split == "test" else None, **scores}


def test_suite_table_follows_the_papers_layout():
    from finetuning.evaluate_all import summary_markdown

    md = summary_markdown([
        _row("NCBI-disease", "ner", precision=0.8, recall=0.9, f1=0.847),
        _row("GAD", "re", precision=0.7, recall=0.8, f1=0.75, f1_std=0.02),
        _row("ChemProt", "re", split="dev", precision=0.5, recall=0.4, f1=0.44),
        _row("BioASQ", "qa", strict_accuracy=0.3, lenient_accuracy=0.5, mrr=0.38),
    ])
    lines = md.splitlines()
    assert lines[0] == "| type | dataset | metric | ours | BioBERT v1.1 (reported) | BERT (reported) | our test set |"
    assert "| NER | NCBI-disease | P | 80.00 | 88.22 |  | test.tsv |" in lines
    assert "|  |  | F1 | 84.70 | 89.71 |  |  |" in lines
    assert "|  |  | F1 | 75.00 ± 2.00 |  |  |  |" in lines  # GAD: mean ± std over folds, no verified cell
    assert "| RE | ChemProt | P | 50.00 (dev only) |  |  | none: dev only (dev also chose the epoch) |" in lines
    assert "|  |  | MRR | 38.00 |  |  |  |" in lines
    assert "metric 1" not in md


def test_headline_and_sweep_record_never_pass_dev_for_test():
    from finetuning.sweep import markdown, run_record

    keys = ("precision", "recall", "f1")
    test = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "test": {"f1": 0.5}, "dev": {"precision": 0.9, "recall": 0.9,
                                                                                      "f1": 0.9}}
    assert headline(test, keys) == ({"precision": 0.5, "recall": 0.5, "f1": 0.5}, "test")
    dev_only = {"dev": {"precision": 0.9, "recall": 0.8, "f1": 0.85}}
    rec = run_record(5e-5, 1, "out", dev_only, keys)
    assert rec["split"] == "dev" and rec["f1"] == 0.85
    assert "DEV ONLY" in markdown([{"learning_rate": 5e-5, "seeds": [1], **{k: 0.85 for k in keys},
                                    **{f"{k}_std": 0.0 for k in keys}}], keys, "dev")
    with pytest.raises(ValueError, match="no precision"):
        run_record(5e-5, 1, "out", {}, keys)


def test_qa_predictions_tsv_puts_gold_beside_ranked_answers():
    from finetuning.qa import predictions_tsv

    text = predictions_tsv({"q1": ["BRCA1", "TP53"], "q2": ["x"]}, {"q1": {"tp53"}, "q2": {"y | z"}, "q3": {"a"}})
    rows = [r.split("\t") for r in text.splitlines()]
    assert rows == [["question_id", "gold", "predictions", "first_correct_rank"], ["q1", "tp53", "BRCA1 | TP53", "2"],
                    ["q2", "y | z", "x", ""], ["q3", "a", "", ""]]
