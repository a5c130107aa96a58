"""PretrainingLoader: order, resume to the sample, world-size change, masking, integrity checks, threads."""

from __future__ import annotations

import gc
import pickle
import re
import threading
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from shard_factory import MASK_ID, SPECIAL_IDS, flip_byte, rewrite_shard, set_values, truncate, write_synthetic_shards

from data_prep import contract
from pretraining.data import PretrainingLoader, ShardError, check_vocab, rank_schedule, verify_shards
from pretraining.masking import mask_batch, num_to_predict, permutation, special_positions

SIZES = [24, 40, 16]  # multiples of 8: shard boundaries fall on round boundaries for micro*world = 8
N = sum(SIZES)
SEED = 7


@pytest.fixture(scope="module")
def dynamic_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dynamic")
    write_synthetic_shards(d, samples_per_shard=SIZES, seq_len=32, max_predictions=6, masking="dynamic", vocab_size=200)
    return d


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("static")
    write_synthetic_shards(d, samples_per_shard=SIZES, seq_len=32, max_predictions=6, masking="static", vocab_size=200)
    return d


def fresh_shards(tmp_path: Path, **kw) -> Path:
    args = dict(samples_per_shard=[16, 16, 16], seq_len=16, max_predictions=4, vocab_size=100) | kw
    write_synthetic_shards(tmp_path, **args)
    return tmp_path


def loader(shard_dir, *, micro=4, accum=1, rank=0, world=1, start=0, **kw) -> PretrainingLoader:
    return PretrainingLoader(shard_dir, micro_batch_size=micro, grad_accum_steps=accum, rank=rank, world_size=world,
                             seed=SEED, start_sample=start, **kw)


def take(shard_dir, rounds: int, **kw) -> list[dict]:
    with loader(shard_dir, **kw) as ld:
        it = iter(ld)
        return [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(rounds)]


def run_ranks(shard_dir, world: int, rounds: int, **kw) -> list[list[dict]]:
    return [take(shard_dir, rounds, rank=r, world=world, **kw) for r in range(world)]


def epoch_shard_boundaries() -> list[int]:
    order = permutation(len(SIZES), SEED, 0)
    return list(np.cumsum([SIZES[k] for k in order]))


# ---------------------------------------------------------------------------------------------------- order

def test_schedule_covers_each_epoch_exactly_once_across_ranks():
    world, micro = 3, 2
    seen = [[] for _ in range(3)]  # per epoch
    for rank in range(world):
        for epoch, k, rows in rank_schedule(SIZES, SEED, 0, micro, world, rank):
            if epoch == 3:
                break
            seen[epoch] += [(k, int(r)) for r in rows]
    for epoch in range(3):
        assert sorted(seen[epoch]) == sorted((k, r) for k, n in enumerate(SIZES) for r in range(n))
    assert seen[0] != seen[1]  # a new permutation each epoch


def test_each_epoch_yields_every_sample_once_and_is_seeded(dynamic_dir):
    batches = take(dynamic_dir, rounds=2 * N // 4)
    ids = np.concatenate([b["sample_ids"] for b in batches])
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:]) == list(range(N))
    assert list(ids[:N]) != list(ids[N:])
    again = np.concatenate([b["sample_ids"] for b in take(dynamic_dir, rounds=N // 4)])
    assert list(again) == list(ids[:N])
    with PretrainingLoader(dynamic_dir, micro_batch_size=4, grad_accum_steps=1, rank=0, world_size=1, seed=8) as ld:
        it = iter(ld)
        ids8 = np.concatenate([next(it)["sample_ids"].numpy() for _ in range(N // 4)])
    assert sorted(ids8) == list(range(N)) and list(ids8) != list(ids[:N])


def test_shard_local_order(dynamic_dir):
    """Within an epoch a shard's samples are consumed contiguously (one shard in memory at a time)."""
    ids = np.concatenate([b["sample_ids"] for b in take(dynamic_dir, rounds=N // 4)])
    starts = np.cumsum([0] + SIZES)
    shard_of = np.searchsorted(starts, ids, side="right") - 1
    changes = np.count_nonzero(np.diff(shard_of))
    assert changes == len(SIZES) - 1


def test_batches_have_contract_shapes_and_types(static_dir):
    b = take(static_dir, rounds=1, micro=5)[0]
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (5, 32), "token_type_ids": (5, 32), "attention_mask": (5, 32), "masked_lm_positions": (5, 6),
        "masked_lm_ids": (5, 6), "next_sentence_labels": (5,), "sample_ids": (5,),
    }
    assert all(v.dtype == np.int64 for v in b.values())


def test_static_batches_equal_file_rows(static_dir):
    manifest = contract.Manifest.load(static_dir)
    rows = {}
    first = 0
    for s in manifest.shards:
        with h5py.File(static_dir / s.file) as f:
            for j in range(s.samples):
                rows[first + j] = {k: f[k][j] for k in f}
        first += s.samples
    for b in take(static_dir, rounds=5, micro=7):
        for i, sid in enumerate(b["sample_ids"]):
            r = rows[int(sid)]
            assert (b["input_ids"][i] == r["input_ids"]).all()
            assert (b["attention_mask"][i] == r["input_mask"]).all()
            assert (b["token_type_ids"][i] == r["segment_ids"]).all()
            assert (b["masked_lm_positions"][i] == r["masked_lm_positions"]).all()
            assert (b["masked_lm_ids"][i] == r["masked_lm_ids"]).all()
            assert b["next_sentence_labels"][i] == r["next_sentence_labels"]


# ---------------------------------------------------------------------------------------------------- resume

def boundary_cut() -> int:
    return int(epoch_shard_boundaries()[0])  # end of the first shard of epoch 0


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("where", ["mid_shard", "shard_boundary", "epoch_boundary", "mid_shard_next_epoch"])
def test_resume_yields_exactly_the_uninterrupted_samples(dynamic_dir, world, where):
    micro = 4
    round_size = micro * world
    cut = {"mid_shard": 8, "shard_boundary": boundary_cut(), "epoch_boundary": N, "mid_shard_next_epoch": N + 8}[where]
    assert cut % round_size == 0
    total_rounds = (cut // round_size) + N // round_size  # runs past the next epoch boundary
    straight = run_ranks(dynamic_dir, world, total_rounds, micro=micro)
    first = run_ranks(dynamic_dir, world, cut // round_size, micro=micro)
    second = run_ranks(dynamic_dir, world, total_rounds - cut // round_size, micro=micro, start=cut)
    for r in range(world):
        split = first[r] + second[r]
        assert len(split) == len(straight[r])
        for a, b in zip(straight[r], split):
            for key in a:  # same samples, same dynamic masks
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_world_size_change_at_global_batch_boundary_loses_and_repeats_nothing(dynamic_dir):
    # global batch 16 both ways: 2 ranks x micro 4 x accum 2, then 1 rank x micro 4 x accum 4
    steps_before = 3
    with_two = run_ranks(dynamic_dir, 2, steps_before * 2, micro=4, accum=2)
    consumed = steps_before * 16
    with_one = take(dynamic_dir, (N - consumed) // 4, micro=4, accum=4, start=consumed)
    ids = [int(i) for rank in with_two for b in rank for i in b["sample_ids"]]
    ids += [int(i) for b in with_one for i in b["sample_ids"]]
    assert len(ids) == N and Counter(ids) == Counter(range(N))
    # and the one-rank continuation is exactly what an uninterrupted one-rank run sees from there on
    straight = take(dynamic_dir, N // 4, micro=4, accum=4)
    np.testing.assert_array_equal(np.concatenate([b["sample_ids"] for b in straight])[consumed:],
                                  np.concatenate([b["sample_ids"] for b in with_one]))


def test_start_sample_must_be_a_round_multiple(dynamic_dir):
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        loader(dynamic_dir, micro=4, world=2, start=4)


def test_samples_consumed_tracks_position(dynamic_dir):
    with loader(dynamic_dir, micro=4, world=2, rank=1, start=16) as ld:
        it = iter(ld)
        for _ in range(3):
            next(it)
        assert ld.samples_consumed == 16 + 3 * 8
        assert ld.global_batch_size == 8 and ld.num_samples == N


# ---------------------------------------------------------------------------------------------------- masking

def masked_example(n=400, seq_len=128, epoch=0, ids=None):
    rng = np.random.default_rng(0)
    from benchmarks.synthetic import synthetic_samples

    s = synthetic_samples(n, seq_len, 1000, rng, short_seq_prob=0.3)
    ids = np.arange(n) if ids is None else ids
    out = mask_batch(s["input_ids"], s["input_mask"], s["segment_ids"], ids, seed=3, epoch=epoch,
                     masked_lm_prob=0.15, max_predictions=20, vocab_size=1000, mask_token_id=MASK_ID,
                     special_token_ids=SPECIAL_IDS)
    return s, out


def test_dynamic_masking_statistics_and_invariants():
    s, (masked, positions, lm_ids) = masked_example()
    lengths = s["input_mask"].sum(1)
    count = (positions != 0).sum(1)
    np.testing.assert_array_equal(count, num_to_predict(lengths, 0.15, 20))
    assert abs(count.sum() / lengths.sum() - 0.15) < 0.02
    special = special_positions(s["input_mask"], s["segment_ids"]) | np.isin(s["input_ids"], SPECIAL_IDS)
    kind = Counter()
    for i in range(len(positions)):
        real = positions[i][: count[i]]
        assert (np.diff(real) > 0).all()  # sorted, unique
        assert (positions[i][count[i]:] == 0).all() and (lm_ids[i][count[i]:] == 0).all()
        assert not special[i, real].any() and (real < lengths[i]).all()
        np.testing.assert_array_equal(lm_ids[i][: count[i]], s["input_ids"][i, real])
        untouched = np.setdiff1d(np.arange(128), real)
        np.testing.assert_array_equal(masked[i, untouched], s["input_ids"][i, untouched])
        for p in real:
            kind["mask" if masked[i, p] == MASK_ID else "keep" if masked[i, p] == s["input_ids"][i, p] else "random"] += 1
    total = sum(kind.values())
    assert abs(kind["mask"] / total - 0.8) < 0.03
    assert abs(kind["random"] / total - 0.1) < 0.025 and abs(kind["keep"] / total - 0.1) < 0.025


def test_mask_depends_only_on_seed_epoch_and_sample_id():
    s, (masked, positions, _) = masked_example()
    sub = np.array([5, 17, 300, 2])  # another batch composition, other order
    m2, p2, _ = mask_batch(s["input_ids"][sub], s["input_mask"][sub], s["segment_ids"][sub], sub, seed=3, epoch=0,
                           masked_lm_prob=0.15, max_predictions=20, vocab_size=1000, mask_token_id=MASK_ID,
                           special_token_ids=SPECIAL_IDS)
    np.testing.assert_array_equal(p2, positions[sub])
    np.testing.assert_array_equal(m2, masked[sub])
    _, (_, p_next_epoch, _) = masked_example(epoch=1)
    assert (p_next_epoch != positions).any(axis=1).mean() > 0.9


def test_dynamic_loader_masks_change_per_epoch(dynamic_dir):
    batches = take(dynamic_dir, rounds=2 * N // 4)
    pos = {}
    for epoch in (0, 1):
        for b in batches[epoch * N // 4:(epoch + 1) * N // 4]:
            for sid, p in zip(b["sample_ids"], b["masked_lm_positions"]):
                pos.setdefault(int(sid), []).append(tuple(p))
    assert all(len(v) == 2 for v in pos.values())
    assert sum(a != b for a, b in pos.values()) > 0.8 * N


# ---------------------------------------------------------------------------------------------------- integrity

FAULTS = {
    "truncated": lambda d, f: truncate(d / f, 0.6),
    "empty": lambda d, f: truncate(d / f, 0.0),
    "bit_flip": lambda d, f: flip_byte(d / f),
    "missing_dataset": lambda d, f: rewrite_shard(d, f, lambda a: {k: v for k, v in a.items() if k != "segment_ids"}),
    "wrong_dtype": lambda d, f: rewrite_shard(d, f, lambda a: a | {"input_mask": a["input_mask"].astype(np.int32)}),
    "id_beyond_vocab": lambda d, f: rewrite_shard(d, f, set_values("input_ids", 100)),
    "position_beyond_seq": lambda d, f: rewrite_shard(d, f, set_values("masked_lm_positions", 16)),
    "unequal_lengths": lambda d, f: rewrite_shard(d, f, lambda a: a | {"next_sentence_labels": a["next_sentence_labels"][:-1]}),
}
EXPECTED = {"truncated": "truncated|HDF5|read", "empty": "empty", "bit_flip": "sha256", "missing_dataset": "missing",
            "wrong_dtype": "dtype", "id_beyond_vocab": "outside", "position_beyond_seq": "outside",
            "unequal_lengths": "rows"}
SCHEMA_FAULTS = {"truncated", "empty", "missing_dataset", "wrong_dtype", "unequal_lengths"}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_verify_shards_names_each_fault(tmp_path, fault):
    d = fresh_shards(tmp_path)
    assert verify_shards(d) == []
    bad = "shard-00001-of-00003.hdf5"
    FAULTS[fault](d, bad)
    errors = verify_shards(d)
    assert errors, fault
    assert all(bad in e and e.file == bad for e in errors)
    assert any(re.search(EXPECTED[fault], e) for e in errors), errors
    assert verify_shards(d, indices=[0, 2]) == []  # split across ranks: the other indices are clean
    assert pickle.loads(pickle.dumps(errors[0])).file == bad  # survives all_gather_object
    if fault in SCHEMA_FAULTS:  # cheap checks at construction catch these without reading data
        with pytest.raises(ValueError, match=bad):
            loader(d)
        ld = loader(d, skip_bad_shards=True)
        assert list(ld.skipped_shards) == [bad] and ld.num_samples == 32
        it = iter(ld)
        ids = np.concatenate([next(it)["sample_ids"].numpy() for _ in range(8)])
        assert sorted(ids) == list(range(16)) + list(range(32, 48))
        ld.close()


def test_bit_flip_reads_back_silently_but_sha_catches_it(tmp_path):
    d = fresh_shards(tmp_path)
    f = "shard-00000-of-00003.hdf5"
    before = flip_byte(d / f)
    with h5py.File(d / f) as h:
        after = int(h["input_ids"][3, 4])
    assert after != before and 0 <= after < 100  # a wrong id inside the vocab: only the checksum can tell
    assert any("sha256" in e for e in verify_shards(d))
    ld = loader(d, exclude_shards=[e.file for e in verify_shards(d)])
    assert ld.skipped_shards and ld.num_samples == 32
    ld.close()


def test_nvidia_shards_without_manifest(tmp_path):
    d = fresh_shards(tmp_path, manifest=False, compression="gzip")  # NVIDIA writes gzip-compressed datasets
    with pytest.warns(UserWarning, match="no manifest.json"):
        ld = loader(d)
    assert [s.sha256 for s in ld.manifest.shards] == ["", "", ""] and ld.manifest.seq_len == 16
    assert next(iter(ld))["input_ids"].shape == (4, 16)
    ld.close()
    with pytest.warns(UserWarning):
        assert verify_shards(d, vocab_size=100) == []
    rewrite_shard(d, "shard-00002-of-00003.hdf5", set_values("input_ids", 150))
    with pytest.warns(UserWarning):
        assert "shard-00002-of-00003.hdf5" in verify_shards(d, vocab_size=100)[0]


def test_unfinished_data_prep_dir_is_not_taken_for_nvidia_shards(tmp_path):
    d = fresh_shards(tmp_path, manifest=False)
    (d / ".shard-00000-of-00003.hdf5.done.json").write_text("{}")  # a killed data_prep run leaves these
    with pytest.raises(ValueError, match="unfinished data_prep run"):
        loader(d)


def test_check_vocab(tmp_path):
    d = fresh_shards(tmp_path)
    manifest = contract.Manifest.load(d)
    check_vocab(manifest, d / "vocab.txt", 100)
    check_vocab(manifest, d, 104)  # a directory holding vocab.txt; a padded model vocab is fine
    other = tmp_path / "other_vocab.txt"
    other.write_text("".join(f"w{i}\n" for i in range(100)))
    with pytest.raises(ValueError, match="vocab mismatch.*other_vocab.txt"):
        check_vocab(manifest, other, 100)
    with pytest.raises(ValueError, match="100 tokens.*only 64 rows"):
        check_vocab(manifest, d / "vocab.txt", 64)


# ---------------------------------------------------------------------------------------------------- threads

def test_error_in_background_thread_is_raised_with_the_shard_named(tmp_path):
    d = fresh_shards(tmp_path)
    ld = loader(d)
    for s in ld.manifest.shards:
        (d / s.file).write_bytes(b"garbage, not HDF5")
    with pytest.raises(ShardError, match=r"shard-0000\d-of-00003.hdf5"):
        next(iter(ld))
    ld.close()


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loader-")]


def wait_gone(timeout=5.0) -> bool:
    deadline = time.time() + timeout
    while loader_threads() and time.time() < deadline:
        time.sleep(0.05)
    return not loader_threads()


def test_close_and_garbage_collection_stop_the_threads(dynamic_dir):
    assert wait_gone()
    with loader(dynamic_dir) as ld:
        next(iter(ld))
        assert len(loader_threads()) == 2
    assert wait_gone()
    it = iter(loader(dynamic_dir))
    next(it)
    assert len(loader_threads()) == 2
    del it
    gc.collect()
    assert wait_gone()


def test_at_most_two_shards_in_memory_while_the_consumer_is_idle(dynamic_dir, monkeypatch):
    from pretraining import data

    loads = []
    real_load = data._ShardReader.load
    monkeypatch.setattr(data._ShardReader, "load", lambda self, job: loads.append(job.file) or real_load(self, job))
    with loader(dynamic_dir, micro=4, prefetch=1) as ld:
        next(iter(ld))
        time.sleep(0.5)  # the threads run ahead as far as they are allowed to
        assert len(loads) == 2


# ---------------------------------------------------------------------------------------------------- real shards

@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_loads_real_data_prep_shards(tmp_path, shared_data, minilm_dir, masking):
    from data_prep.run import main as prep

    out = tmp_path / masking
    argv = [str(shared_data / "corpus" / "pmc_oa"), "--output-dir", str(out), "--vocab", str(minilm_dir),
            "--lower-case", "--seq-len", "128", "--num-shards", "2", "--workers", "1", "--no-progress"]
    prep(argv + (["--dynamic-masking"] if masking == "dynamic" else []))
    assert verify_shards(out) == []
    ld = PretrainingLoader(out, micro_batch_size=8, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                           special_token_ids=range(0, 104), mask_token_id=103)  # MiniLM: [PAD] 0 ... [MASK] 103
    check_vocab(ld.manifest, minilm_dir, 30522)
    it = iter(ld)
    ids, predicted, tokens = [], 0, 0
    while len(ids) < ld.num_samples:
        b = next(it)
        ids += b["sample_ids"].tolist()
        real = b["masked_lm_positions"] != 0
        assert (b["masked_lm_ids"][real] >= 104).all()  # no special or [unused] token is ever a prediction target
        predicted, tokens = predicted + int(real.sum()), tokens + int(b["attention_mask"].sum())
    ld.close()
    assert sorted(ids[: ld.num_samples]) == list(range(ld.num_samples))
    assert 0.13 < predicted / tokens < 0.16


def test_benchmark_loader_reports_both_readers(tmp_path):
    from benchmarks.loader_bench import LoaderBenchConfig, main

    rows = main(LoaderBenchConfig(seq_lens=[32], seconds=0.2, num_shards=2, samples_per_shard=256, micro_batch=16,
                                  vocab_size=100, work_dir=str(tmp_path)))
    assert [(r["seq_len"], r["masking"]) for r in rows] == [(32, "static"), (32, "dynamic")]
    assert all(r["loader_samples_per_s"] > 0 and r["baseline_samples_per_s"] > 0 for r in rows)


def test_order_and_masks_are_pinned():
    """Golden values: if these change, a run resumed under the new code sees other samples/masks than it saved."""
    assert permutation(10, 7, 0).tolist() == [4, 8, 7, 1, 2, 9, 6, 3, 5, 0]
    assert permutation(10, 7, 1).tolist() == [2, 4, 7, 8, 6, 5, 0, 1, 9, 3]
    ids = np.arange(5, 37, dtype=np.int32)[None, :]
    ids[0, 0], ids[0, -1] = 2, 3
    masked, positions, lm_ids = mask_batch(
        ids, np.ones_like(ids, dtype=np.int8), np.zeros_like(ids, dtype=np.int8), np.array([123]), seed=7, epoch=2,
        masked_lm_prob=0.15, max_predictions=6, vocab_size=100, mask_token_id=4)
    assert positions.tolist() == [[4, 7, 13, 23, 25, 0]] and lm_ids.tolist() == [[9, 12, 18, 28, 30, 0]]
    assert masked[0, [4, 7, 13, 23, 25]].tolist() == [4, 26, 4, 4, 4]


def test_packed_batches_come_from_the_loader_thread(dynamic_dir):
    """pack=True: each batch carries the unpadded layout, equal to pack() of its own padded tensors, built in the
    background thread (the training step only copies it)."""
    from pretraining.attention import Packed, pack

    with loader(dynamic_dir, pack=True) as ld:
        it = iter(ld)
        for _ in range(3):
            batch = next(it)
            p = batch["packed"]
            assert isinstance(p, Packed) and isinstance(p.max_seqlen, int)
            ref = pack(batch["attention_mask"], batch["input_ids"], batch["token_type_ids"],
                       batch["masked_lm_positions"], batch["masked_lm_ids"], batch["next_sentence_labels"])
            for name, value in vars(ref).items():
                got = getattr(p, name)
                assert (got.tolist() if hasattr(got, "tolist") else got) == (
                    value.tolist() if hasattr(value, "tolist") else value), name
            assert p.tokens == int(batch["attention_mask"].sum())
