"""launch/shard_parts.py (array data prep: input split, manifest merge) and launch/sweep_parts.py (array sweeps)."""

from __future__ import annotations

import json

import pytest

from biobert.errors import run
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
    assert shard_parts.cli(["merge", str(out), "--parts", "2"]) == shard_parts.NOT_READY  # part 1 not done
    assert not (out / "manifest.json").exists()
    _prep(files[1], out / "part-00001", vocab_dir, "--seed", "2", "--validation-fraction", "0.5")
    assert shard_parts.cli(["merge", str(out), "--parts", "2"]) == 0
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
    assert run(shard_parts.cli, ["merge", str(out)]) == 2 and not (out / "manifest.json").exists()


def test_sweep_index_mapping():
    lrs, seeds = [5e-5, 3e-5], [1, 2, 3]
    runs = [sweep_parts.run_for_index(i, lrs, seeds) for i in range(6)]
    assert runs == [(5e-5, 1), (5e-5, 2), (5e-5, 3), (3e-5, 1), (3e-5, 2), (3e-5, 3)]
    assert sweep_parts.run_dir_name(5e-5, 2) == "lr5e-05_seed2"
    with pytest.raises(ValueError, match="--array=0-5"):
        sweep_parts.run_for_index(6, lrs, seeds)


def test_slice_command_prints_the_share_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    for i, n in enumerate([900, 500, 400]):
        (tmp_path / f"f{i}.txt").write_text("x" * n)
    assert run(shard_parts.cli, ["slice", "--task", "1", "--tasks", "2", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "f1.txt")]
    for argv, fragment in ((["slice", "--task", "2", "--tasks", "2", str(tmp_path)], "task 2 is outside 0..1"),
                           (["slice", "--task", "0", "--tasks", "5", str(tmp_path)], "--array=0-2"),
                           (["slice", "--task", "0", "--tasks", "1", str(tmp_path / "nope")], "no such file"),
                           (["slice", "--tasks", "1", str(tmp_path)], "--task is required"),
                           (["merg", str(tmp_path)], "did you mean 'merge'?"),
                           (["merge", str(tmp_path), "--parts", "0"], "parts must be >= 1")):
        assert run(shard_parts.cli, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)


def test_sweep_run_command_and_its_errors(tmp_path, capsys):
    from finetuning.evaluate_all import SCORES

    assert sweep_parts.TASKS == tuple(SCORES)
    assert run(sweep_parts.cli, ["run", "--index", "4", "--lrs", "5e-5", "3e-5", "--seeds", "1", "2", "3"]) == 0
    assert capsys.readouterr().out == "3e-05 2 lr3e-05_seed2\n"  # what finetune.sbatch reads as LR SEED DIRNAME
    for argv, fragment in ((["run", "--index", "6", "--lrs", "5e-5", "3e-5", "--seeds", "1", "2", "3"], "--array=0-5"),
                           (["run", "--index", "0", "--lrs", "fast", "--seeds", "1"], "lrs: expected"),
                           (["collect", str(tmp_path), "--task", "nr", "--lrs", "1e-5", "--seeds", "1"], "invalid choice"),
                           (["sweep"], "expected one of run, collect")):
        assert run(sweep_parts.cli, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)
    args = ["collect", str(tmp_path), "--task", "ner", "--lrs", "5e-5", "--seeds", "1", "2"]
    assert sweep_parts.cli(args) == sweep_parts.NOT_READY  # no run has finished
    for seed, f1 in ((1, 0.8), (2, 0.9)):
        run_dir = tmp_path / sweep_parts.run_dir_name(5e-5, seed)
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text(json.dumps({"precision": f1, "recall": f1, "f1": f1}))
    assert sweep_parts.cli(args) == 0
    table = json.loads((tmp_path / "sweep.json").read_text())["table"]
    assert table[0]["f1"] == pytest.approx(0.85) and table[0]["seeds"] == [1, 2]
