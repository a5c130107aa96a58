"""launch/shard_parts.py (array data prep: input split, manifest merge) and launch/sweep_parts.py (array sweeps)."""

from __future__ import annotations

import json

import pytest

from launch import shard_parts, sweep_parts


def test_slice_covers_every_file_once_balanced_by_bytes(tmp_path):
    sizes = [900, 500, 400, 300, 100]
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}.txt").write_text("x" * n)
    parts = [shard_parts.slice_inputs([str(tmp_path)], t, 2) for t in range(2)]
    names = [sorted(p.name for p in part) for part in parts]
    assert sorted(names[0] + names[1]) == [f"f{i}.txt" for i in range(5)]
    assert names == [["f0.txt", "f2.txt", "f4.txt"], ["f1.txt", "f3.txt"]]  # 900+400+100 vs 500+300
    with pytest.raises(ValueError, match="--array=0-4"):
        shard_parts.slice_inputs([str(tmp_path)], 0, 6)
    with pytest.raises(ValueError, match="outside"):
        shard_parts.slice_inputs([str(tmp_path)], 2, 2)


def _prep(corpus_file, out, vocab_dir, *extra):
    from data_prep.run import main as prep

    prep([str(corpus_file), "--output-dir", str(out), "--vocab", str(vocab_dir), "--num-shards", "1", "--workers", "1",
          "--no-progress", *extra])


def test_merge_parts_into_one_valid_dataset(corpus, vocab_dir, tmp_path):
    from data_prep.validate import validate

    out = tmp_path / "shards"
    files = sorted(corpus.iterdir())
    _prep(files[0], out / "part-00000", vocab_dir, "--seed", "1", "--validation-fraction", "0.5")
    assert shard_parts.main(["merge", str(out), "--parts", "2"]) == shard_parts.NOT_READY  # part 1 not done
    assert not (out / "manifest.json").exists()
    _prep(files[1], out / "part-00001", vocab_dir, "--seed", "2", "--validation-fraction", "0.5")
    assert shard_parts.main(["merge", str(out), "--parts", "2"]) == 0
    report = validate(out)
    assert report.ok, report.errors
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [json.loads((out / p / "manifest.json").read_text()) for p in ("part-00000", "part-00001")]
    assert report.samples == sum(p["shards"][0]["samples"] for p in parts)
    assert manifest["settings"]["part_seeds"] == [1, 2]
    assert [s["file"] for s in manifest["shards"]] == [f"part-0000{i}/{p['shards'][0]['file']}"
                                                      for i, p in enumerate(parts)]
    held = [p["validation"] for p in parts if p.get("validation")]
    assert held and manifest["validation"]["documents"] == sum(v["documents"] for v in held)
    assert report.validation.samples == sum(v["instances"] for v in held)  # the parts' splits, checked as one


def test_merge_refuses_parts_that_disagree(corpus, vocab_dir, tmp_path):
    out = tmp_path / "shards"
    files = sorted(corpus.iterdir())
    _prep(files[0], out / "part-00000", vocab_dir)
    _prep(files[1], out / "part-00001", vocab_dir, "--seq-len", "64")
    with pytest.raises(ValueError, match=r"part-00001/manifest.json: seq_len 64 differs"):
        shard_parts.merge(out, 2)
    assert shard_parts.main(["merge", str(out)]) == 2 and not (out / "manifest.json").exists()


def test_sweep_index_mapping():
    lrs, seeds = [5e-5, 3e-5], [1, 2, 3]
    runs = [sweep_parts.run_for_index(i, lrs, seeds) for i in range(6)]
    assert runs == [(5e-5, 1), (5e-5, 2), (5e-5, 3), (3e-5, 1), (3e-5, 2), (3e-5, 3)]
    assert sweep_parts.run_dir_name(5e-5, 2) == "lr5e-05_seed2"
    with pytest.raises(ValueError, match="--array=0-5"):
        sweep_parts.run_for_index(6, lrs, seeds)
