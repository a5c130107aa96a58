"""The README's main command: the whole pipeline on the embedded default, end to end (real launcher, real ranks)."""

from __future__ import annotations

import json
import sys

import pytest
from launch_testlib import REPO

sys.path.insert(0, str(REPO))


def test_demo_ner_corpus_is_valid_iob2(tmp_path):
    from finetuning.ner_data import read_conll
    from launch.demo_ner import HELD_OUT, write_demo_ner

    out = write_demo_ner(tmp_path, seed=3)
    train = read_conll(out / "train.tsv", "iob2")
    test_text = (out / "test.tsv").read_text()
    assert len(train.sentences) == 240
    tags = {t for s in train.sentences for t in s.tags}
    assert tags == {"O", "B-Disease", "I-Disease"}
    assert not any(d.split()[0] in (out / "train.tsv").read_text().split() for d in HELD_OUT)
    assert any(d.split()[0] in test_text.split() for d in HELD_OUT)  # unseen entities are scored too
    assert write_demo_ner(tmp_path / "again", seed=3).joinpath("train.tsv").read_bytes() == \
        (out / "train.tsv").read_bytes()


@pytest.mark.slow
def test_whole_pipeline_on_the_embedded_default(tmp_path, capsys):
    from launch.pipeline import main, parse_args

    summary = main(parse_args(["--output-dir", str(tmp_path / "demo"), "--ner-epochs", "2", "max_steps=6",
                    "checkpoint.every_steps=3", "schedule.warmup_steps=2"]))
    out = capsys.readouterr().out
    assert "pipeline summary |" in out and "NER F1" in out
    pre = summary["pretraining"]
    assert pre["steps"] == 6 and pre["final_loss"] < pre["first_loss"]  # fresh MLM head: the loss must fall
    assert pre["samples_per_s"] > 0
    assert summary["data"]["shards"] == 2 and summary["data"]["instances"] > 50
    assert summary["ner"]["f1"] > 0.6  # a 3-tag task: chance is far below this
    demo = tmp_path / "demo"
    assert (demo / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((demo / "summary.json").read_text())["ner"] == summary["ner"]
    from transformers import AutoModel

    AutoModel.from_pretrained(demo / "model")  # the exported checkpoint is an ordinary HF model
    metrics = json.loads((demo / "ner" / "metrics.json").read_text())
    assert metrics["f1"] == summary["ner"]["f1"]
