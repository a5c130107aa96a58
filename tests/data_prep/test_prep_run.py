"""End-to-end runs of data_prep/run.py: contract, determinism, workers, re-runs, bad inputs."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from prep_helpers import article, write_pubmed

from biobert import errors
from data_prep import contract, run
from data_prep.extract import DataError
from data_prep.validate import validate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_corpus):
    """Three small inputs of the three kinds: BERT text, PubMed .xml.gz, and a second text file."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(demo_corpus.read_text(encoding="utf-8"), encoding="utf-8")
    text = demo_corpus.read_text(encoding="utf-8").split("\n\n")
    records = "\n".join(article(str(100 + i), f"Study {i} of disease.", f"<AbstractText>{' '.join(t.splitlines())}</AbstractText>")
                        for i, t in enumerate(text))
    write_pubmed(d / "b.xml.gz", records)
    (d / "c.txt").write_text("\n\n".join(reversed(text)), encoding="utf-8")
    return d


def prep(inputs, out, vocab, **kw):
    kw.setdefault("num_shards", 3)
    kw.setdefault("workers", 1)
    kw.setdefault("dupe_factor", 3)
    kw.setdefault("group_mb", 0.000001)  # one group per file: exercises the work split
    return run.main(run.PrepConfig(inputs=[str(i) for i in inputs], output_dir=str(out), vocab=str(vocab),
                                   progress=False, **kw))


def shard_bytes(d):
    """Training and validation shards, by path relative to the output directory."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("shard-*.hdf5"))}


def test_static_run_follows_the_contract(corpus, uncased_vocab, tmp_path, capsys):
    s = prep([corpus], tmp_path / "out", uncased_vocab)
    assert "docs" in capsys.readouterr().out  # the summary line
    assert s["docs"] == 30 and s["instances"] > 100 and s["shards"] == 3 and s["tokens"] > 3000
    m = contract.Manifest.load(tmp_path / "out")
    assert m.masking == "static" and m.seq_len == 128 and m.max_predictions == 20 and m.lower_case
    assert m.vocab_hash == contract.vocab_hash(contract.read_vocab_tokens(uncased_vocab)) and m.vocab_size == 30522
    assert [sh.file for sh in m.shards] == [f"shard-0000{k}-of-00003.hdf5" for k in range(3)]
    sizes = [sh.samples for sh in m.shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == s["instances"]  # balanced
    with h5py.File(tmp_path / "out" / m.shards[0].file) as f:
        assert {k: (f[k].dtype, f[k].shape[1:]) for k in f} == {
            "input_ids": (np.int32, (128,)), "input_mask": (np.int8, (128,)), "segment_ids": (np.int8, (128,)),
            "masked_lm_positions": (np.int32, (20,)), "masked_lm_ids": (np.int32, (20,)),
            "next_sentence_labels": (np.int8, ())}
        assert f.attrs["masking"] == "static" and f.attrs["vocab_hash"] == m.vocab_hash
    rep = validate(tmp_path / "out", uncased_vocab)
    assert rep.ok, rep.errors
    assert abs(rep.stats()["mask_rate"] - 0.15) < 0.01
    assert not list((tmp_path / "out").glob(".*"))  # no temp files, sidecars or work dir left


def test_same_seed_same_bytes_any_worker_count(corpus, uncased_vocab, tmp_path):
    prep([corpus], tmp_path / "w1", uncased_vocab, workers=1)
    prep([corpus], tmp_path / "w2", uncased_vocab, workers=2)
    one, two = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert one == two and len(one) == 4 and "validation/shard-00000-of-00001.hdf5" in one
    prep([corpus], tmp_path / "seed2", uncased_vocab, seed=2)
    assert shard_bytes(tmp_path / "seed2") != one


def test_dynamic_masking_and_seq_len_512(corpus, uncased_vocab, tmp_path):
    prep([corpus], tmp_path / "st", uncased_vocab, seq_len=512, num_shards=1)
    s = prep([corpus], tmp_path / "dy", uncased_vocab, seq_len=512, num_shards=1, dynamic_masking=True)
    m = contract.Manifest.load(tmp_path / "dy")
    assert m.masking == "dynamic" and m.max_predictions == 80
    with h5py.File(tmp_path / "dy" / m.shards[0].file) as f:
        assert set(f) == set(contract.DYNAMIC_SCHEMA) and f["input_ids"].shape == (s["instances"], 512)
    st_size = sum(len(b) for b in shard_bytes(tmp_path / "st").values())
    dy_size = sum(len(b) for b in shard_bytes(tmp_path / "dy").values())
    assert dy_size < 0.9 * st_size
    assert validate(tmp_path / "dy").ok


def test_cased_run_keeps_case_and_mismatches_fail(corpus, cased_vocab, uncased_vocab, tmp_path):
    s = prep([corpus / "a.txt"], tmp_path / "cased", cased_vocab, num_shards=1, lower_case=False)
    m = contract.Manifest.load(tmp_path / "cased")
    assert m.lower_case is False and s["instances"] > 0
    tokens = contract.read_vocab_tokens(cased_vocab)
    with h5py.File(tmp_path / "cased" / m.shards[0].file) as f:
        ids = f["input_ids"][:]
    assert tokens.index("TP") in ids and tokens.index("The") in ids  # upper-case pieces survive
    with pytest.raises(DataError, match="vocab is cased"):
        prep([corpus / "a.txt"], tmp_path / "x", cased_vocab, lower_case=True)
    with pytest.raises(DataError, match="vocab is uncased"):
        prep([corpus / "a.txt"], tmp_path / "x", uncased_vocab, lower_case=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_rerun_skips_complete_output_and_rebuilds_a_missing_shard(corpus, uncased_vocab, tmp_path):
    out = tmp_path / "out"
    prep([corpus], out, uncased_vocab)
    before = shard_bytes(out)
    again = prep([corpus], out, uncased_vocab)
    assert again["up_to_date"] and again["reused_shards"] == 3
    # a lost shard: only that one is rebuilt
    (out / "shard-00001-of-00003.hdf5").unlink()
    resumed = prep([corpus], out, uncased_vocab)
    assert resumed["reused_shards"] == 2 and not resumed["up_to_date"]
    assert shard_bytes(out) == before
    # an interrupted run: no manifest yet, sidecars of the finished shards (0 and 2) present
    m = contract.Manifest.load(out)
    (out / contract.MANIFEST_NAME).unlink()
    (out / "shard-00001-of-00003.hdf5").unlink()
    for sh in m.shards:
        if sh.file != "shard-00001-of-00003.hdf5":
            (out / f".{sh.file}.done.json").write_text(json.dumps({"fingerprint": m.settings["fingerprint"],
                                                                     "shard": sh.__dict__}))
    resumed = prep([corpus], out, uncased_vocab, workers=2)
    assert resumed["reused_shards"] == 2 and shard_bytes(out) == before
    changed = prep([corpus], out, uncased_vocab, seed=99)  # other settings: nothing reused
    assert changed["reused_shards"] == 0 and shard_bytes(out) != before


@pytest.mark.parametrize("kind", ["truncated_gz", "malformed_xml", "non_utf8", "empty"])
def test_bad_input_fails_cleanly_naming_the_file(kind, corpus, uncased_vocab, tmp_path):
    bad_dir = tmp_path / "in"
    bad_dir.mkdir()
    good = bad_dir / "good.txt"
    good.write_text((corpus / "a.txt").read_text(encoding="utf-8"), encoding="utf-8")
    if kind == "truncated_gz":
        data = (corpus / "b.xml.gz").read_bytes()
        (bad := bad_dir / "bad.xml.gz").write_bytes(data[: len(data) - 40])
        pattern = r"bad\.xml\.gz: truncated or corrupt gzip"
    elif kind == "malformed_xml":
        (bad := bad_dir / "bad.xml").write_text("<PubmedArticleSet>\n<PubmedArticle>\n</PubmedArticleSet>\n")
        pattern = r"bad\.xml: malformed XML at line 3"
    elif kind == "non_utf8":
        (bad := bad_dir / "bad.txt").write_bytes(b"ok line\n\xff\xfe broken\n")
        pattern = r"bad\.txt: line 2: not valid UTF-8"
    else:
        (bad := bad_dir / "bad.txt").write_text("\n\n   \n")
        pattern = r"bad\.txt: empty input"
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        prep([bad_dir], out, uncased_vocab)
    assert not list(out.glob("shard-*")) and not (out / contract.MANIFEST_NAME).exists()
    assert not list(out.glob(".*"))  # no work files either
    rc = errors.run(run.cli, [str(bad_dir), "--output-dir", str(out), "--vocab", str(uncased_vocab),
                              "--no-progress"])
    assert rc == 2
    s = prep([bad_dir], out, uncased_vocab, skip_bad_files=True, num_shards=1)
    assert len(s["skipped_files"]) == 1 and bad.name in s["skipped_files"][0]
    alone = prep([good], tmp_path / "alone", uncased_vocab, num_shards=1)
    assert (s["docs"], s["tokens"]) == (alone["docs"], alone["tokens"])  # nothing of the bad file got in
    assert validate(out).ok


def test_failed_rerun_with_new_settings_leaves_no_old_shards(corpus, uncased_vocab, tmp_path):
    out = tmp_path / "out"
    prep([corpus / "a.txt"], out, uncased_vocab)
    (bad := tmp_path / "bad.txt").write_bytes(b"\xff\n")
    with pytest.raises(DataError, match="bad.txt: line 1"):
        prep([corpus / "a.txt", bad], out, uncased_vocab)
    assert list(out.iterdir()) == []  # the old shards would otherwise pass for a manifest-less dataset


def test_no_text_at_all_and_too_many_shards(uncased_vocab, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"e\.txt: empty input"):
        prep([empty], tmp_path / "o", uncased_vocab)
    one = tmp_path / "one.txt"
    one.write_text("A single sentence about p53.\n")
    with pytest.raises(DataError, match="fewer than --num-shards"):
        prep([one], tmp_path / "o", uncased_vocab, num_shards=50, dupe_factor=1)


def test_cli_parses_the_documented_flags(corpus, uncased_vocab, tmp_path):
    rc = run.cli([str(corpus / "a.txt"), "--output-dir", str(tmp_path / "o"), "--vocab", str(uncased_vocab),
                  "--lower-case", "--seq-len", "128", "--max-predictions", "19", "--dupe-factor", "2",
                  "--num-shards", "2", "--workers", "1", "--seed", "3", "--dynamic-masking", "--no-progress"])
    assert rc == 0
    m = contract.Manifest.load(tmp_path / "o")
    assert (m.max_predictions, m.seed, m.masking, len(m.shards), m.settings["dupe_factor"]) == (19, 3, "dynamic", 2, 2)


def test_work_split_groups_small_files_and_balances_ranks(tmp_path):
    from data_prep.work import group_files

    files = []
    for name, size in [("a.nxml", 300), ("b.nxml", 300), ("c.nxml", 500), ("d.xml.gz", 300), ("e.nxml", 10)]:
        (p := tmp_path / name).write_bytes(b"x" * size)
        files.append(p)
    groups = group_files(files, 1000)
    assert [[f.name for f in g] for g in groups] == [["a.nxml", "b.nxml", "c.nxml"], ["d.xml.gz"], ["e.nxml"]]
    assert run._assign([10, 50, 30, 30], 2) == [0, 0, 1, 1]  # largest first to the least loaded: 60 + 60
