"""vocab.py (train a WordPiece vocab), the demo, and the benchmark script on tiny input."""

from __future__ import annotations

from benchmarks import prep_bench
from biobert.errors import run as run_cli
from data_prep import contract, demo, run, vocab
from data_prep.wordpiece import load_wordpiece


def test_train_cased_vocab_and_use_it(demo_corpus, tmp_path):
    assert vocab.cli([str(demo_corpus), "--output-dir", str(tmp_path / "v"), "--vocab-size", "600", "--cased",
                       "--min-frequency", "1"]) == 0
    tokens = contract.read_vocab_tokens(tmp_path / "v" / "vocab.txt")
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and 300 < len(tokens) <= 600
    assert "TP" in tokens or "TP53" in tokens  # upper case kept
    wp = load_wordpiece(tmp_path / "v")
    assert wp.lower_case is False
    (ids,) = wp.encode(["Metformin lowers glucose."])
    assert wp.unk_id not in ids
    s = run.main(run.PrepConfig(inputs=[str(demo_corpus)], output_dir=str(tmp_path / "o"), vocab=str(tmp_path / "v"),
                                num_shards=1, workers=1, progress=False))
    assert s["instances"] > 0 and contract.Manifest.load(tmp_path / "o").lower_case is False


def test_train_uncased_vocab(demo_corpus, tmp_path):
    path = vocab.train_vocab([demo_corpus], tmp_path / "u", 500, lower_case=True, min_frequency=1)
    tokens = contract.read_vocab_tokens(path)
    assert not any(c.isupper() for t in tokens if not t.startswith("[") for c in t)
    assert load_wordpiece(tmp_path / "u").lower_case is True


def test_demo_main_prepares_the_shipped_pmc_articles(tmp_path, capsys):
    out = demo.main(demo.PrepDemoConfig(output_dir=str(tmp_path / "demo")))
    assert out["docs"] == 5 and out["instances"] > 500 and out["check"]["samples"] == out["instances"]
    assert out["validation"]["documents"] == 1  # 5 articles at 1%: the rule "at least one from 4 on" holds one out
    assert "validate:" in capsys.readouterr().out
    for argv, fragment in ((["--seq-len", "4"], "seq_len 4 out of range"),
                           (["--validation-fraction", "0.9"], "validation_fraction must be in [0, 0.5]")):
        assert run_cli(demo.cli, [*argv, "--output-dir", str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()  # refused before anything is written
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err
    sources = (demo.DEMO_PMC / "SOURCES.md").read_text()
    for f in sorted(demo.DEMO_PMC.glob("*.nxml.gz")):  # every shipped article has its source and licence stated
        assert f"`{f.name}`" in sources


def test_benchmark_runs_on_tiny_input(demo_corpus, capsys):
    assert prep_bench.cli(["--inputs", str(demo_corpus), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "x ceiling" in out and "shard MB/s" in out
