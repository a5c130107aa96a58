"""The README's main command: the whole pipeline on the embedded real data, end to end (real launcher, real ranks);
the shipped NER sample and where it came from."""

from __future__ import annotations

import json
import sys

import pytest
from launch_testlib import REPO

sys.path.insert(0, str(REPO))


def test_shipped_ner_sample_is_real_iob2_with_its_source_stated():
    from finetuning.ner_data import read_conll
    from launch.demo_ner import SIZES, sample_dir

    d = sample_dir()
    for split, n in SIZES:
        f = read_conll(d / f"{split}.tsv", "iob2")
        assert len(f.sentences) == n and {t for s in f.sentences for t in s.tags} == {"O", "B-Disease", "I-Disease"}
    source = (d / "SOURCE.md").read_text()
    assert "NCBI disease corpus" in source and "Creative Commons Attribution 4.0" in source
    assert sum(f.stat().st_size for f in d.iterdir()) < 200_000  # a sample, not the corpus


def test_ner_sample_is_exactly_what_make_sample_cuts_from_the_corpus(shared_data, tmp_path):
    from launch.demo_ner import make_sample, sample_dir

    made = make_sample(shared_data / "ner/NCBI-disease-IOB", tmp_path)
    for name in ("train.tsv", "devel.tsv", "test.tsv"):
        assert (made / name).read_bytes() == (sample_dir() / name).read_bytes(), name
    full = set((shared_data / "ner/NCBI-disease-IOB/test.tsv").read_text().split("\n\n"))
    assert all(block in full for block in (made / "test.tsv").read_text().strip("\n").split("\n\n"))


@pytest.mark.slow
def test_whole_pipeline_on_the_embedded_default(tmp_path, capsys):
    from launch.pipeline import main, parse_args

    summary = main(parse_args(["--output-dir", str(tmp_path / "demo"), "max_steps=6", "checkpoint.every_steps=3",
                               "schedule.warmup_steps=2"]))
    out = capsys.readouterr().out
    assert "pipeline summary |" in out and "NER test F1 (seeds 1): general-domain start" in out and "continued" in out
    data = summary["data"]
    assert data["docs"] == 5 and data["validation_docs"] == 1 and data["shards"] == 2 and data["instances"] > 500
    pre = summary["pretraining"]
    assert pre["steps"] == 6 and pre["final_loss"] < pre["first_loss"]  # fresh MLM head: the loss must fall
    ner = summary["ner"]
    assert list(ner) == ["general-domain start", "continued"] and ner["general-domain start"]["model"] == "minilm"
    for row in ner.values():  # real disease NER on 400 sentences (0.39-0.40 measured): above an untrained tagger's 0
        assert row["f1"] > 0.2 and row["test_source"].endswith("test.tsv"), row
    demo = tmp_path / "demo"
    assert (demo / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((demo / "summary.json").read_text())["ner"] == summary["ner"]
    from transformers import AutoModel

    AutoModel.from_pretrained(demo / "model")  # the exported checkpoint is an ordinary HF model
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (demo / "model" / "README.md").read_text()
    metrics = json.loads((demo / "ner" / "continued" / "seed1" / "metrics.json").read_text())
    assert metrics["f1"] == ner["continued"]["f1"]
