"""run.py end to end on a tiny configuration of every suite: files, fields, baselines and ratios (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run
from benchmarks.grid import SuiteConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    """A 1-layer BERT with MiniLM's tokenizer: the finetune suite's plumbing without MiniLM's training time."""
    import shutil

    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d)
    for f in minilm_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


def tiny(out, **kw) -> SuiteConfig:
    base = dict(use_real_data=False, prep_workers=[1], prep_repeats=1, seq_lens=[64], loader_micro_batch=16,
                loader_seconds=0.1, loader_samples_per_shard=256, models=["tiny"], micro_batches=[2, 4],
                train_steps=1, train_warmup=1, world_sizes=[1], finetune_examples=16, finetune_seq_len=128,
                finetune_batch=8)
    return SuiteConfig(output_dir=str(out), **{**base, **kw})


def check_rows(rows):
    for r in rows:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["baseline_name"], r
        want = r["baseline"] / r["ours"] if r.get("lower_is_better") else r["ours"] / r["baseline"]
        assert r["ratio"] == pytest.approx(want), r


def test_every_suite_writes_results(tmp_path, tiny_bert):
    res = run.main(tiny(tmp_path, finetune_model=str(tiny_bert)))
    assert res["errors"] == []
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    hw = saved["hardware"]
    assert hw["cores"] >= 1 and hw["cpu"] and hw["torch"] and hw["deepspeed"] and "gpu" in hw
    assert {r["suite"] for r in saved["rows"]} == {"prep", "loader", "train", "finetune"}
    check_rows(saved["rows"])

    prep = [r for r in saved["rows"] if r["suite"] == "prep"]
    assert prep[0]["docs_per_s"] > 0 and prep[0]["tokens_per_s"] > 0 and "tokenizers" in prep[0]["baseline_name"]
    loader = [r for r in saved["rows"] if r["suite"] == "loader"]
    assert {(r["params"]["seq_len"], r["params"]["masking"]) for r in loader} == {(64, "static"), (64, "dynamic")}
    train = [r for r in saved["rows"] if r["suite"] == "train"]
    metrics = {r["metric"] for r in train}
    assert {"samples/s", "tokens/s", "TFLOPS (useful)", "MFU", "peak memory", "data-wait fraction"} <= metrics
    assert {r["params"]["micro_batch"] for r in train} == {2, 4}
    compiled = [r for r in train if r["params"].get("compiled")]  # model.compile, measured on the first case
    assert {r["baseline_name"] for r in compiled} == {"ours, eager", "HF BertForPreTraining, same DeepSpeed config"}
    assert all("BertForPreTraining" in r["baseline_name"] for r in train if r not in compiled)
    ft = [r for r in saved["rows"] if r["suite"] == "finetune"]
    assert ft and ft[0]["baseline_name"].startswith("HF Trainer") and "synthetic" in saved["data"]["finetune_data"]
    assert "synthetic" in saved["data"]["shards"]

    md = (tmp_path / "results.md").read_text()
    for suite in ("prep", "loader", "train", "finetune"):
        assert f"## {suite}" in md
    assert "| case | metric | ours | baseline | ratio |" in md and hw["cpu"] in md
    assert md.count("\n| ") >= len(saved["rows"]) + 4  # a table line per row (+ header lines)
    for png in ("train_vs_micro_batch.png", "loader.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG)
        assert png in saved["plots"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp files


def test_bad_suite_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'trian' is not one of prep, loader, train, finetune"):
        run.parse_args(["--output-dir", str(tmp_path), "--suite", "prep,trian"])


def test_cli_lists_reach_the_config(tmp_path):
    cfg = run.parse_args(["--output-dir", str(tmp_path), "--quick", "--suite", "train", "--micro-batches", "2,8",
                          "--precisions", "bf16", "--world-sizes", "1,2", "--synthetic"])
    cases = cfg.train_cases({})
    assert cfg.quick and cfg.suites == ["train"] and cfg.world_sizes == [1, 2]
    assert [(c.seq_len, c.micro_batch, c.precision) for c in cases] == [(128, 2, "bf16"), (128, 8, "bf16"),
                                                                       (512, 2, "bf16"), (512, 8, "bf16")]
    assert all(c.shards is None for c in cases) and not cfg.real


@pytest.mark.slow
def test_scaling_world_size_two(tmp_path):
    """World size 2 through the deepspeed launcher (2 CPU ranks): scaling rows and the world-size plot."""
    res = run.main(tiny(tmp_path, suites=["train"], micro_batches=[2], world_sizes=[1, 2], scaling_micro_batch=2))
    assert res["errors"] == []
    scaling = res["extra"]["scaling"]
    assert {(s["engine"], s["world_size"]) for s in scaling} == {(e, w) for e in ("ours", "hf_baseline")
                                                                 for w in (1, 2)}
    assert all(s["efficiency"] > 0 for s in scaling)
    two = [r for r in res["rows"] if r["params"].get("world_size") == 2 and r["metric"] == "samples/s"]
    assert two and two[0]["params"]["threads"] == 1
    eff = [r for r in res["rows"] if r["metric"] == "scaling efficiency"]
    assert len(eff) == 1 and eff[0]["ours"] > 0 and eff[0]["baseline"] > 0
    check_rows(res["rows"])
    assert (tmp_path / "train_vs_world_size.png").read_bytes().startswith(PNG)
