"""Real short CPU fine-tunes of the packaged MiniLM on subsampled real data: each task must learn.

Budget: about a minute per task on 2 cores (subsampled data, max_seq_len 128, 2 epochs, fused AdamW).
"""

import json

import pytest

from finetuning.common import subsample
from finetuning.config import NERConfig, QAConfig, REConfig
from finetuning.ner_data import read_conll

QUICK = dict(max_seq_len=128, batch_size=16, eval_batch_size=64, progress=False, num_threads=2, seed=1)


def test_ner_learns_and_writes_outputs(shared_data, minilm_dir, tmp_path):
    from finetuning.ner import main

    cfg = NERConfig(model=str(minilm_dir), data=str(shared_data / "ner/NCBI-disease-IOB"), output_dir=str(tmp_path),
                    max_train_examples=300, max_eval_examples=120, epochs=2, learning_rate=2e-4, do_eval=False,
                    **QUICK)
    m = main(cfg)
    # An untrained tagger finds ~no disease mention (F1 ~0); 300 sentences give a clearly non-trivial F1.
    assert m["f1"] > 0.2, m["train"]["history"]
    assert m["collapsed"] is False and "warnings" not in m
    assert set(m["per_type"]) <= {"Disease"} and m["test"]["n_gold_entities"] > 20
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["f1"] == pytest.approx(m["f1"]) and saved["train"]["train_examples_per_s"] > 0
    lines = (tmp_path / "test_predictions.tsv").read_text().split("\n")
    rows = [ln.split(" ") for ln in lines if ln]  # token gold pred: conlleval's layout
    test_sentences = subsample(read_conll(shared_data / "ner/NCBI-disease-IOB/test.tsv").sentences, 120, cfg.seed)
    assert [r[0] for r in rows] == [t for s in test_sentences for t in s.tokens]  # one per token
    assert [r[1] for r in rows] == [t for s in test_sentences for t in s.tags]  # the gold label beside it
    assert all(len(r) == 3 and r[2] in ("O", "B-Disease", "I-Disease") for r in rows)
    assert m["test_source"].endswith("test.tsv")
    # The fine-tuned directory is a complete HF model: our loader and transformers both read it.
    config = json.loads((tmp_path / "model/config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"] and config["id2label"]["1"] == "B-Disease"
    from transformers import BertForTokenClassification

    hf = BertForTokenClassification.from_pretrained(tmp_path / "model")
    assert hf.classifier.weight.shape == (3, 384)


def test_re_learns_on_gad_with_header_and_index_tsv(shared_data, minilm_dir, tmp_path):
    from finetuning.relation import main
    from finetuning.relation_data import read_re_file

    examples = subsample(read_re_file(shared_data / "re/GAD/train.tsv"), 500, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("".join(f"{e.text}\t{e.label}\n" for e in examples[:300]))
    test = examples[300:]
    (data / "test.tsv").write_text("index\tsentence\tlabel\n" + "".join(f"{i}\t{e.text}\t{e.label}\n"
                                                                     for i, e in enumerate(test)))
    cfg = REConfig(model=str(minilm_dir), data=str(data), output_dir=str(tmp_path / "out"), epochs=3,
                   learning_rate=2e-4, **QUICK)
    m = main(cfg)
    majority = max(sum(e.label == c for e in test) for c in ("0", "1")) / len(test)
    assert m["negative_label"] == "0" and m["labels"] == ["0", "1"]
    assert m["accuracy"] > majority + 0.08, (m["accuracy"], majority, m["train"]["history"])
    assert m["collapsed"] is False
    n_positive = sum(e.label == "1" for e in examples[:300])  # the fresh classifier started at the training prior
    assert m["classifier_prior"] == pytest.approx([(301 - n_positive) / 302, (n_positive + 1) / 302])
    rows = (tmp_path / "out/test_predictions.tsv").read_text().splitlines()
    assert rows[0] == "index\tline\tgold\tprediction\tsentence" and len(rows) == 201 and rows[1].startswith("0\t2\t")
    assert [r.split("\t")[2] for r in rows[1:]] == [e.label for e in test]
    assert (tmp_path / "out/model/model.safetensors").is_file()


def test_re_cross_validation_writes_folds(shared_data, minilm_dir, tmp_path):
    from finetuning.relation import main

    cfg = REConfig(model=str(minilm_dir), data=str(shared_data / "re/GAD"), output_dir=str(tmp_path), cv_folds=3,
                   max_train_examples=90, epochs=1, learning_rate=5e-5, **QUICK)
    m = main(cfg)
    folds = json.loads((tmp_path / "folds.json").read_text())
    assignment = [e["fold"] for e in folds["examples"]]
    assert folds["k"] == 3 and sorted(set(assignment)) == [0, 1, 2] and len(assignment) == 90
    assert [f["fold"] for f in m["folds"]] == [0, 1, 2]
    for k in range(3):
        test_rows = (tmp_path / f"fold_{k}/test.tsv").read_text().splitlines()
        assert len(test_rows) == assignment.count(k) == 30
        assert json.loads((tmp_path / f"fold_{k}/metrics.json").read_text())["test"]["f1"] == m["folds"][k]["f1"]
    mean = sum(f["f1"] for f in m["folds"]) / 3
    assert m["f1"] == pytest.approx(mean) and m["f1_std"] >= 0 and m["negative_label"] == "0"


def test_qa_learns_and_aggregates_by_question(shared_data, minilm_dir, tmp_path):
    from finetuning.qa import main

    cfg = QAConfig(model=str(minilm_dir), data=str(shared_data / "qa/BioASQ"), output_dir=str(tmp_path),
                   max_train_examples=40, max_eval_examples=20, max_query_len=32, doc_stride=32, epochs=2,
                   learning_rate=2e-4, **QUICK)
    m = main(cfg)
    assert m["n_questions"] == 20 and not m["qa_head_from_checkpoint"]
    # A random span is almost never the exact answer; after training the top 5 hold it for a good share.
    assert m["lenient_accuracy"] >= 0.3 and m["mrr"] > 0.15, m
    ranked = json.loads((tmp_path / "test_predictions.json").read_text())
    assert len(ranked) == 20 and all(1 <= len(v) <= 5 for v in ranked.values())
    sub = json.loads((tmp_path / "test_bioasq.json").read_text())
    assert {q["id"] for q in sub["questions"]} == set(ranked)
    rows = [r.split("\t") for r in (tmp_path / "test_predictions.tsv").read_text().splitlines()]
    assert rows[0] == ["question_id", "gold", "predictions", "first_correct_rank"] and len(rows) == 21
    ranks = [int(r[3]) for r in rows[1:] if r[3]]
    assert all(r[1] for r in rows[1:]) and sum(1 / k for k in ranks) / 20 == pytest.approx(m["mrr"])
    assert "20% of its questions held out as test (seed 1)" in m["test_source"]

    # Starting QA from an already QA-fine-tuned directory keeps its head: scores reproduce without training.
    again = main(QAConfig(**{**cfg.__dict__, "model": str(tmp_path / "model"), "do_train": False,
                             "output_dir": str(tmp_path / "eval")}))
    assert again["qa_head_from_checkpoint"] and again["mrr"] == pytest.approx(m["mrr"])


def _few_entity_ner_dir(shared_data, path, n_free=47):
    """n_free entity-free training sentences and one with an entity; dev and test dense (real NCBI sentences)."""
    from finetuning.bench_data import has_entity

    train = read_conll(shared_data / "ner/NCBI-disease-IOB/train.tsv").sentences
    picked = [s for s in train if not has_entity(s)][:n_free] + [next(s for s in train if has_entity(s))]
    path.mkdir()
    text = "".join("".join(f"{t}\t{g}\n" for t, g in zip(s.tokens, s.tags)) + "\n" for s in picked)
    (path / "train.tsv").write_text(text)
    dev = read_conll(shared_data / "ner/NCBI-disease-IOB/devel.tsv").sentences[:40]
    (path / "devel.tsv").write_text("".join("".join(f"{t}\t{g}\n" for t, g in zip(s.tokens, s.tags)) + "\n"
                                            for s in dev))
    return path


def test_ner_that_learned_only_o_says_so(shared_data, minilm_dir, tmp_path, capsys):
    from finetuning.ner import main

    data = _few_entity_ner_dir(shared_data, tmp_path / "data")
    cfg = NERConfig(model=str(minilm_dir), data=str(data), output_dir=str(tmp_path / "out"), epochs=2,
                    learning_rate=3e-4, save_model=False, **QUICK)
    m = main(cfg)
    assert m["dev"]["n_pred_entities"] == 0 and m["collapsed"] is True
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == m["warnings"][0] and line.startswith("warning: no entity predicted on dev after 2 epochs")
    assert "--epochs 10" in line and "--learning-rate 0.0006" in line
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["collapsed"] is True and saved["warnings"] == m["warnings"]


def test_re_that_predicts_one_class_says_so(shared_data, minilm_dir, tmp_path, capsys):
    from finetuning.relation import main
    from finetuning.relation_data import read_re_file

    examples = read_re_file(shared_data / "re/GAD/train.tsv")
    train = [e for e in examples if e.label == "0"][:47] + [next(e for e in examples if e.label == "1")]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("".join(f"{e.text}\t{e.label}\n" for e in train))
    (data / "test.tsv").write_text("".join(f"{e.text}\t{e.label}\n" for e in examples[-40:]))
    cfg = REConfig(model=str(minilm_dir), data=str(data), output_dir=str(tmp_path / "out"), epochs=2,
                   learning_rate=3e-4, save_model=False, **QUICK)
    m = main(cfg)
    assert m["collapsed"] is True and m["warnings"][0].startswith("warning: every example predicted '0' on test")
    assert capsys.readouterr().err.strip().splitlines()[-1] == m["warnings"][0]
    assert json.loads((tmp_path / "out/metrics.json").read_text())["warnings"] == m["warnings"]
