"""The Figure-2 command end to end on a tiny pretraining run: 2 checkpoints x 2 seeds x a tiny NER set, resumable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretraining"))
import engine_fixtures as ef  # noqa: E402

FT = dict(epochs=1.0, batch_size=8, max_train_examples=24, max_eval_examples=16, num_threads=1, progress=False,
          do_eval=False, select_on_dev=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data, minilm_dir):
    """4 steps of a tiny BERT continued from a headless tiny start (MiniLM vocab), checkpoints at steps 2 and 4."""
    from transformers import BertConfig

    from pretraining.config import PRESETS
    from pretraining.model import BertModel, save_pretrained
    from pretraining.trainer import main

    base = tmp_path_factory.mktemp("curve")
    shards = ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)
    torch.manual_seed(0)
    start = save_pretrained(BertModel(BertConfig(vocab_size=30522, **PRESETS["tiny"])), base / "start",
                            tokenizer_dir=minilm_dir)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = ef.tiny_run(base / "run", shards, None, max_steps=4, model={"init": str(start), "tokenizer": None},
                          checkpoint={"every_steps": 2, "keep_last": 5})
        main(ef.load_tiny(run, ["ds.train_batch_size=2"]))
    finally:
        torch.set_num_threads(n)
    return base / "run", start


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory, shared_data):
    from finetuning.bench_data import write_subset

    out = tmp_path_factory.mktemp("ner") / "ncbi"
    return write_subset(shared_data / "ner" / "NCBI-disease-IOB", out, 60)


def _cfg(run, data, out, finetune=None, **kw):
    from finetuning.pretraining_curve import CurveConfig

    return CurveConfig(**{"runs": [str(run)], "data": str(data), "output_dir": str(out), "seeds": [1, 2], **kw},
                       finetune=dict(FT) if finetune is None else finetune)


def test_curve_end_to_end_then_resumes_without_redoing(tiny_run, ner_data, tmp_path, monkeypatch):
    from finetuning import pretraining_curve as pc

    run, start = tiny_run
    out = tmp_path / "curve"
    result = pc.main(_cfg(run, ner_data, out))
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["step0", "run@2", "run@4"] and result["base"] == str(start)  # step 0 = the run's init
    assert [rows[k]["n"] for k in rows] == [2, 2, 2] and all(0 <= r["mean"] <= 1 for r in rows.values())
    tokens = [json.loads(line)["tokens"] for line in (run / "metrics.jsonl").read_text().splitlines()[:4]]
    assert rows["run@2"]["tokens"] == sum(tokens[:2]) and rows["run@4"]["tokens"] == sum(tokens)
    assert rows["step0"]["tokens"] == 0 and rows["run@4"]["corpus_tokens"] > 0
    png = Path(result["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = (out / "curve.md").read_text()
    assert "| run@4 | 4 |" in table and not (out / ".exports").exists()  # exports are temporary
    # each point's exported model is the checkpoint: seeds differ in the fine-tune only
    saved = json.loads((out / "curve.json").read_text())
    assert set(saved["points"]["run@2"]["seeds"]) == {"1", "2"}

    calls = []
    real = pc.run_task
    monkeypatch.setattr(pc, "run_task", lambda cfg, kind: calls.append((cfg.model, cfg.seed)) or real(cfg, kind))
    pc.main(_cfg(run, ner_data, out))
    assert calls == []  # everything finished: nothing redone
    del saved["points"]["run@4"]["seeds"]["2"]
    (out / "curve.json").write_text(json.dumps(saved))
    again = pc.main(_cfg(run, ner_data, out, seeds=[1, 2, 3]))
    assert sorted(s for _, s in calls) == [2, 3, 3, 3]  # the dropped seed plus the new seed at every point
    assert {r["key"]: r["n"] for r in again["rows"]} == {"step0": 3, "run@2": 3, "run@4": 3}


def test_curve_refuses_mixed_settings_and_bad_input(tiny_run, ner_data, tmp_path):
    from finetuning import pretraining_curve as pc

    run, _ = tiny_run
    out = tmp_path / "curve"
    pc.main(_cfg(run, ner_data, out, steps=[4], seeds=[1]))
    changed = _cfg(run, ner_data, out, steps=[4], seeds=[1])
    changed.finetune["learning_rate"] = 1e-4
    with pytest.raises(ValueError, match="other settings"):
        pc.main(changed)
    (out / "curve.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ValueError, match="being written by another curve"):
        pc.main(_cfg(run, ner_data, out, steps=[4], seeds=[1]))
    (out / "curve.lock").write_text("999999999")  # a dead one: taken over
    pc.main(_cfg(run, ner_data, out, steps=[4], seeds=[1]))
    assert not (out / "curve.lock").exists()
    with pytest.raises(ValueError, match="3"):  # no checkpoint at step 3
        pc.cli([str(run), "--data", str(ner_data), "--output-dir", str(tmp_path / "x"), "--steps", "3"])
    with pytest.raises((ValueError, OSError)):  # not a pretraining run
        pc.cli([str(tmp_path), "--data", str(ner_data), "--output-dir", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="not ner options"):
        _cfg(run, ner_data, out, finetune={"cv_folds": 3})


def test_corpus_size_variant(tiny_run, ner_data, tmp_path, shared_data, minilm_dir):
    """Two runs on corpora of 1 and 2 MEDLINE files: one point each at its newest checkpoint, x = corpus tokens."""
    from data_prep.run import PrepConfig
    from data_prep.run import main as prep
    from finetuning import pretraining_curve as pc
    from pretraining.trainer import main as pretrain

    run, start = tiny_run
    files = sorted((shared_data / "corpus" / "pubmed").glob("pubmed-sample-*.xml.gz"))[:2]
    prep(PrepConfig(inputs=[str(f) for f in files], output_dir=str(tmp_path / "shards2"), vocab=str(minilm_dir),
                    num_shards=2, progress=False, dynamic_masking=True))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        big = ef.tiny_run(tmp_path / "big", tmp_path / "shards2", None, max_steps=2,
                          model={"init": str(start), "tokenizer": None}, checkpoint={"every_steps": 2})
        pretrain(ef.load_tiny(big, ["ds.train_batch_size=2"]))
    finally:
        torch.set_num_threads(n)
    result = pc.main(_cfg(run, ner_data, tmp_path / "c", by="corpus", seeds=[1], runs=[str(run), str(tmp_path / "big")]))
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["step0", "run@4", "big@2"]  # the newest checkpoint of each run, by corpus size
    assert 1.8 < rows["big@2"]["corpus_tokens"] / rows["run@4"]["corpus_tokens"] < 2.2
    assert Path(result["png"]).stat().st_size > 5000


def test_points_run_coarse_to_fine():
    from finetuning.pretraining_curve import coarse_to_fine

    pts = [dict(series=s, step=k) for s in ("a", "b") for k in (50, 100, 150, 200, 250, 300)]
    order = [(p["series"], p["step"]) for p in coarse_to_fine(pts)]
    assert order[:4] == [("a", 300), ("b", 300), ("a", 150), ("b", 150)]  # the ends first, then the middle
    assert sorted(order) == sorted((p["series"], p["step"]) for p in pts)
