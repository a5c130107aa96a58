"""Instance creation: masking statistics, NSP balance, segments, padding, truncation, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.instances import InstanceConfig, _truncate, _Uniforms, create_instances
from data_prep.wordpiece import load_wordpiece


@pytest.fixture(scope="module")
def wp(minilm_dir):
    return load_wordpiece(minilm_dir)


def synthetic_docs(wp, n_docs=300, seed=0):
    """Documents of 4-12 sentences of 5-30 real word pieces (ids of non-special tokens)."""
    rng = np.random.default_rng(seed)
    real = wp.replacement_ids
    return [[rng.choice(real, size=rng.integers(5, 31)).tolist() for _ in range(rng.integers(4, 13))]
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def block(wp):
    docs = synthetic_docs(wp)
    cfg = InstanceConfig(seq_len=128, max_predictions=20)
    return docs, cfg, create_instances(docs, np.random.default_rng(7), cfg, wp)


def unmask(arr):
    """input_ids with the original tokens put back at the predicted positions."""
    ids = arr["input_ids"].copy()
    r, s = np.nonzero(arr["masked_lm_positions"] > 0)
    ids[r, arr["masked_lm_positions"][r, s]] = arr["masked_lm_ids"][r, s]
    return ids


def test_shapes_dtypes_padding_and_segments(block, wp):
    _, cfg, a = block
    n = len(a["input_ids"])
    assert n > 500
    assert a["input_ids"].dtype == np.int32 and a["input_ids"].shape == (n, 128)
    assert a["input_mask"].dtype == np.int8 and a["segment_ids"].dtype == np.int8
    assert a["masked_lm_positions"].dtype == np.int32 and a["masked_lm_positions"].shape == (n, 20)
    assert a["next_sentence_labels"].dtype == np.int8 and a["next_sentence_labels"].shape == (n,)
    length = a["input_mask"].sum(1)
    pos = np.arange(128)
    assert (a["input_mask"] == (pos < length[:, None])).all()
    assert (a["input_ids"][a["input_mask"] == 0] == 0).all() and (a["segment_ids"][a["input_mask"] == 0] == 0).all()
    ids = unmask(a)
    assert (ids[:, 0] == wp.cls_id).all()
    assert (ids[np.arange(n), length - 1] == wp.sep_id).all()
    # exactly two [SEP]: end of A (last segment-0 token) and end of B; segments are 0...0 1...1
    assert ((ids == wp.sep_id).sum(1) == 2).all()
    a_end = (a["segment_ids"] == 0).sum(1) - (a["input_mask"] == 0).sum(1)
    assert (ids[np.arange(n), a_end - 1] == wp.sep_id).all()
    assert (np.diff(a["segment_ids"].astype(int), axis=1)[a["input_mask"][:, 1:] == 1] >= 0).all()
    assert (length <= 128).all() and (a_end >= 3).all() and (length - a_end >= 2).all()


def test_masking_rate_80_10_10_and_positions(block, wp):
    _, _, a = block
    p, mid = a["masked_lm_positions"], a["masked_lm_ids"]
    used = p > 0
    length = a["input_mask"].sum(1)
    k = np.minimum(20, np.maximum(1, np.rint(length * 0.15)))
    assert (used.sum(1) == k).all()  # non-special candidates are plentiful here, so every row gets its k
    assert abs(used.sum() / length.sum() - 0.15) < 0.01
    # used slots first, strictly increasing (sorted, unique); unused slots position 0 / id 0
    assert not (used[:, 1:] & ~used[:, :-1]).any()
    assert (np.diff(p, axis=1)[used[:, 1:]] > 0).all()
    assert (mid[~used] == 0).all()
    orig = unmask(a)
    assert not wp.is_special[orig[np.nonzero(used)[0], p[used]]].any()  # [CLS]/[SEP]/[PAD] never predicted
    r, s = np.nonzero(used)
    now = a["input_ids"][r, p[r, s]]
    frac_mask = (now == wp.mask_id).mean()
    frac_same = (now == mid[r, s]).mean()
    frac_rand = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015 and abs(frac_rand - 0.1) < 0.015


def test_masking_changes_only_predicted_positions(block, wp):
    docs, cfg, a = block
    # pairs are drawn before masking, so the same seed without masking gives the original ids
    plain = create_instances(docs, np.random.default_rng(7), InstanceConfig(static_masking=False), wp)
    assert np.array_equal(unmask(a), plain["input_ids"])
    changed = a["input_ids"] != plain["input_ids"]
    predicted = np.zeros_like(changed)
    r, s = np.nonzero(a["masked_lm_positions"] > 0)
    predicted[r, a["masked_lm_positions"][r, s]] = True
    assert not (changed & ~predicted).any()
    assert changed.sum() > 0.85 * predicted.sum()  # 80% [MASK] + ~10% random (rarely the same token)


def test_nsp_balance_and_random_next_from_other_docs(block):
    _, _, a = block
    frac = a["next_sentence_labels"].mean()
    # a chunk of one sentence is always random-next (as in BERT), so slightly above one half
    assert 0.45 < frac < 0.6


def test_short_seq_prob_gives_short_instances(wp):
    docs = synthetic_docs(wp, 100, seed=1)
    a = create_instances(docs, np.random.default_rng(0), InstanceConfig(short_seq_prob=1.0), wp)
    b = create_instances(docs, np.random.default_rng(0), InstanceConfig(short_seq_prob=0.0), wp)
    assert a["input_mask"].sum(1).mean() < 0.75 * b["input_mask"].sum(1).mean()
    assert len(a["input_ids"]) > len(b["input_ids"])


def test_long_sentences_are_truncated_to_seq_len(wp):
    docs = [[list(range(1000, 1400))] * 3, [list(range(2000, 2300))] * 2]
    a = create_instances(docs, np.random.default_rng(0), InstanceConfig(seq_len=64, max_predictions=10), wp)
    assert (a["input_mask"].sum(1) == 64).all()


def test_truncate_matches_berts_token_loop():
    u = _Uniforms(np.random.default_rng(0))
    for la in range(0, 25):
        for lb in range(0, 25):
            for m in (3, 10, 30):
                a0, a1, b0, b1 = _truncate(la, lb, m, u)
                ra, rb = la, lb
                while ra + rb > m:  # Google's truncate_seq_pair, lengths only
                    if ra > rb:
                        ra -= 1
                    else:
                        rb -= 1
                assert (a1 - a0, b1 - b0) == (ra, rb) and 0 <= a0 <= a1 <= la and 0 <= b0 <= b1 <= lb


def test_whole_word_masking_masks_all_pieces(wp):
    docs = synthetic_docs(wp, 200, seed=3)
    cont = np.flatnonzero(wp.is_continuation).astype(np.int32)
    rng = np.random.default_rng(5)
    for d in docs:  # make a third of the tokens continuation pieces
        for s in d:
            for i in range(1, len(s)):
                if rng.random() < 0.33:
                    s[i] = int(rng.choice(cont))
    a = create_instances(docs, np.random.default_rng(1), InstanceConfig(whole_word_masking=True), wp)
    ids = unmask(a)
    chosen = np.zeros_like(ids, dtype=bool)
    r, s = np.nonzero(a["masked_lm_positions"] > 0)
    chosen[r, a["masked_lm_positions"][r, s]] = True
    is_cont = wp.is_continuation[ids] & (a["input_mask"] == 1)
    # a continuation piece is chosen exactly when the piece before it is (unless that is [CLS]/[SEP])
    both = is_cont[:, 1:] & ~wp.is_special[ids[:, :-1]]
    assert (chosen[:, 1:][both] == chosen[:, :-1][both]).all()
    assert abs(chosen.sum() / a["input_mask"].sum() - 0.15) < 0.02


def test_dynamic_masking_keeps_ids_and_drops_prediction_arrays(wp):
    docs = synthetic_docs(wp, 50)
    a = create_instances(docs, np.random.default_rng(0), InstanceConfig(static_masking=False), wp)
    assert "masked_lm_positions" not in a and not (a["input_ids"] == wp.mask_id).any()


def test_same_rng_same_instances(wp):
    docs = synthetic_docs(wp, 60)
    a = create_instances(docs, np.random.default_rng([1, 2]), InstanceConfig(), wp)
    b = create_instances(docs, np.random.default_rng([1, 2]), InstanceConfig(), wp)
    c = create_instances(docs, np.random.default_rng([1, 3]), InstanceConfig(), wp)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["masked_lm_positions"], c["masked_lm_positions"])


def test_config_validation():
    with pytest.raises(ValueError, match="max_predictions"):
        InstanceConfig(seq_len=128, max_predictions=0)
    with pytest.raises(ValueError, match="masked_lm_prob"):
        InstanceConfig(masked_lm_prob=1.5)
