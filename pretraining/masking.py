"""Dynamic BERT masking (80/10/10), vectorised over a batch with a counter-based RNG.

Every random number is a hash of (seed, epoch, global sample id, token position), so the mask of sample i in
epoch e is a pure function of (seed, e, i): it does not depend on which batch, rank or resumed run masks it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_GOLDEN32 = 0x9E3779B9
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_LOW16 = np.uint64(0xFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_KEEP_MASK_TOKEN = int(0.8 * 65536)  # low 16 bits < this -> [MASK]
_KEEP_RANDOM = int(0.9 * 65536)  # < this -> random token, else keep the original


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (for the per-(seed, epoch) base key)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (array arithmetic wraps modulo 2**64)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(_M1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_M2)
    x ^= x >> np.uint64(31)
    return x


def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 (Wellons) finaliser, in place on a uint32 array: SIMD-friendly for the big [n, L] pass."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample, a bijection of the sample id for each (seed, epoch)."""
    base = np.uint64(_mix_int(_mix_int(seed) ^ (epoch & _MASK64)))
    return _mix(np.asarray(sample_ids, dtype=np.uint64).reshape(-1) ^ base)


def permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of range(n) that is a pure function of `keys` (argsort of a bijective hash: no ties, and unlike
    numpy's Generator streams it can never change with a numpy upgrade, which would silently reorder a resumed run)."""
    base = 0
    for k in keys:
        base = _mix_int(base ^ (k & _MASK64) ^ _GOLDEN)
    return np.argsort(_mix(np.arange(n, dtype=np.uint64) ^ np.uint64(base)), kind="stable")


def num_to_predict(lengths: np.ndarray, masked_lm_prob: float, max_predictions: int) -> np.ndarray:
    """BERT's count: min(max_pred, max(1, round(len * prob))), len counting [CLS]/[SEP] (round half to even, as Python)."""
    return np.minimum(max_predictions, np.maximum(1, np.round(lengths * masked_lm_prob))).astype(np.int64)


def special_positions(input_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """[CLS] at 0, the [SEP] closing segment A and the last real token: never masked, whatever their ids."""
    n, seq_len = input_mask.shape
    special = np.zeros((n, seq_len), dtype=bool)
    special[:, 0] = True
    lengths = input_mask.sum(axis=1, dtype=np.int64)
    rows = np.arange(n)
    special[rows, np.maximum(lengths - 1, 0)] = True
    has_b = (segment_ids != 0).any(axis=1)
    first_b = np.argmax(segment_ids != 0, axis=1)
    special[rows[has_b], np.maximum(first_b[has_b] - 1, 0)] = True
    return special


def mask_batch(
    input_ids: np.ndarray,
    input_mask: np.ndarray,
    segment_ids: np.ndarray,
    sample_ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    masked_lm_prob: float,
    max_predictions: int,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask unmasked ids [n, L] -> (masked input_ids int32 [n, L], masked_lm_positions int32 [n, P], masked_lm_ids int32 [n, P]).

    Positions are sorted and unique; slots beyond a sample's predictions hold position 0 / id 0 (the contract's "unused").
    """
    n, seq_len = input_ids.shape
    p = int(max_predictions)
    lengths = input_mask.sum(axis=1, dtype=np.int64)
    valid = (input_mask != 0) & ~special_positions(input_mask, segment_ids)
    special_ids = np.fromiter(special_token_ids, dtype=np.int64)
    if len(special_ids) > 8:  # e.g. all [unusedN]: one table lookup beats a pass per id
        valid &= ~np.isin(input_ids, special_ids, kind="table")
    else:
        for tok in special_ids:
            valid &= input_ids != tok

    # One 32-bit hash per token ranks the candidates. Its low bits are replaced by the position, so one np.partition of
    # plain uint32 values (no argpartition indirection, no ties) finds the lowest-ranked positions.
    keys = sample_keys(seed, epoch, sample_ids)[:, None]
    pos_bits = max(1, (seq_len - 1).bit_length())
    pos32 = np.arange(seq_len, dtype=np.uint32)
    rank = _mix32((keys >> np.uint64(32)).astype(np.uint32) + pos32 * np.uint32(_GOLDEN32))
    rank &= np.uint32(~((1 << pos_bits) - 1) & 0xFFFFFFFF)
    rank |= pos32
    rank[~valid] = np.iinfo(np.uint32).max
    count = np.minimum(num_to_predict(lengths, masked_lm_prob, p), valid.sum(axis=1))

    best = np.partition(rank, p - 1, axis=1)[:, :p] if seq_len > p else rank
    best.sort(axis=1)
    width = best.shape[1]
    keep = np.arange(width)[None, :] < count[:, None]
    positions = (best & np.uint32((1 << pos_bits) - 1)).astype(np.int64)
    positions = np.sort(np.where(keep, positions, seq_len), axis=1)  # kept ones first, ascending
    positions[positions == seq_len] = 0
    if width < p:
        positions = np.pad(positions, ((0, 0), (0, p - width)))
    keep = np.arange(p)[None, :] < count[:, None]

    original = np.take_along_axis(input_ids, positions, axis=1)
    # Re-mixed so these bits are independent of the score bits that selected the position.
    hv = _mix(_mix(keys + positions.astype(np.uint64) * np.uint64(_GOLDEN)) + np.uint64(_GOLDEN))
    choice = hv & _LOW16
    random_ids = (((hv >> np.uint64(16)) & _LOW32) * np.uint64(vocab_size)) >> np.uint64(32)
    replacement = np.where(choice < _KEEP_MASK_TOKEN, mask_token_id, np.where(choice < _KEEP_RANDOM, random_ids, original))
    # Unused slots point at position 0 ([CLS]) and write its own id back: a no-op.
    replacement = np.where(keep, replacement, original).astype(np.int32)
    masked = np.array(input_ids, dtype=np.int32, copy=True)
    np.put_along_axis(masked, positions, replacement, axis=1)
    masked_lm_ids = np.where(keep, original, 0).astype(np.int32)
    return masked, positions.astype(np.int32), masked_lm_ids
