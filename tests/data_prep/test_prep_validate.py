"""validate.py must catch corrupted shards: flipped bytes, out-of-range ids, wrong dtypes, bad slots."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from data_prep import contract, demo, validate


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "good"
    demo.main(demo.PrepDemoConfig(output_dir=str(d), dupe_factor=2, num_shards=2))
    return d


@pytest.fixture
def shard_dir(good_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(good_dir, d)
    return d


def rewrite(d, mutate, fix_checksum=True):
    """Apply mutate(h5py.File) to shard 0; optionally refresh its manifest checksum so only the content check fires."""
    m = contract.Manifest.load(d)
    path = d / m.shards[0].file
    with h5py.File(path, "r+") as f:
        mutate(f)
    if fix_checksum:
        m.shards[0].sha256 = contract.sha256_file(path)
        m.save(d)
    return path


def test_good_shards_pass_with_statistics(good_dir, minilm_dir, capsys):
    rep = validate.validate(good_dir, minilm_dir)
    assert rep.ok, rep.errors
    s = rep.stats()
    assert s["shards"] == 2 and s["samples"] > 30 and abs(s["mask_rate"] - 0.15) < 0.02
    assert 0.3 < s["nsp_random_fraction"] < 0.8
    assert validate.cli([str(good_dir)]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_is_a_checksum_mismatch(shard_dir, capsys):
    m = contract.Manifest.load(shard_dir)
    path = shard_dir / m.shards[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    rep = validate.validate(shard_dir)
    assert any(m.shards[1].file in e and "sha256" in e for e in rep.errors)
    assert validate.cli([str(shard_dir)]) == 1
    assert "sha256 differs" in capsys.readouterr().err


def test_out_of_range_id(shard_dir):
    def mutate(f):
        ids = f["input_ids"][:]
        ids[3, 1] = 40000  # beyond the 30522 vocab
        f["input_ids"][...] = ids

    path = rewrite(shard_dir, mutate)
    errors = validate.validate(shard_dir).errors
    assert errors == [f"{path}: sample 3: input id out of range [0, 30522)"]


def test_wrong_dtype(shard_dir):
    def mutate(f):
        labels = f["next_sentence_labels"][:]
        del f["next_sentence_labels"]
        f.create_dataset("next_sentence_labels", data=labels.astype(np.int64))

    path = rewrite(shard_dir, mutate)
    errors = validate.validate(shard_dir).errors
    assert errors == [f"{path}: next_sentence_labels has dtype int64, expected int8"]


def test_bad_prediction_slots_and_padding(shard_dir):
    def mutate(f):
        p = f["masked_lm_positions"][:]
        p[0, :2] = p[0, 1::-1]  # unsorted
        p[1, 0] = 500  # outside the sequence
        f["masked_lm_positions"][...] = p
        mask = f["input_mask"][:]
        mask[2, 0] = 0  # a hole in the mask
        f["input_mask"][...] = mask

    rewrite(shard_dir, mutate)
    text = "\n".join(validate.validate(shard_dir).errors)
    assert "sample 0: masked_lm_positions not sorted" in text
    assert "sample 1: masked_lm_positions outside the sequence" in text
    assert "sample 2: input_mask is not ones followed by zeros" in text


def test_missing_shard_dataset_and_manifest(shard_dir, tmp_path):
    path = rewrite(shard_dir, lambda f: f.__delitem__("segment_ids"))
    assert f"{path}: dataset 'segment_ids' missing" in validate.validate(shard_dir).errors
    path.unlink()
    assert f"{path}: listed in the manifest but missing" in validate.validate(shard_dir).errors
    assert "no manifest" in validate.validate(tmp_path / "nothing").errors[0]


def test_vocab_hash_mismatch(good_dir, cased_vocab):
    errors = validate.validate(good_dir, cased_vocab).errors
    assert len(errors) == 1 and "vocab hash" in errors[0]
