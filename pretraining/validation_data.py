"""The held-out validation split, for the trainer's evaluation: where its shards are, and a fixed subset as batches.

Where: a data_prep directory (format 2) lists its split in manifest.json (``validation/shard-*.hdf5``, checksums,
static masks). A directory without one (NVIDIA's shards, an older data_prep run) takes an explicit
``validation_dir`` (NVIDIA's layout keeps ``test/`` beside ``training/``): its own manifest, or one synthesised from
its files as for training shards. ``validation_split`` returns ``(base, manifest)`` whose shard files are relative to
``base``, so ``data_shards.verify_shards(base, manifest)`` checks them like training shards.

What: ``validation_batches`` reads the first ``max_samples`` samples in manifest order (data_prep shuffles every
shard, so that is a random subset, and the same one at every evaluation), trimmed to a multiple of the world size;
each rank gets the same number of micro-batches (sizes differ by at most one, none empty), so collective forwards
(ZeRO-3 gathers) never wait on a rank that ran out. Shards without masks (dynamic masking) are masked by the same
pure function as the loader, keyed by (seed, epoch 0, sample index): identical at every evaluation. Sum the per-batch
losses weighted by their masked-token / sample counts and all-reduce: the totals then do not depend on the batching.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_prep.contract import Manifest
from pretraining.data_shards import load_manifest, open_shard
from pretraining.masking import mask_batch

# shard dataset -> batch key, as the training loader names them (pretraining.data.BATCH_KEYS)
_KEYS = {"input_ids": "input_ids", "segment_ids": "token_type_ids", "input_mask": "attention_mask",
         "masked_lm_positions": "masked_lm_positions", "masked_lm_ids": "masked_lm_ids",
         "next_sentence_labels": "next_sentence_labels"}


def validation_split(shard_dir: str | Path, validation_dir: str | Path | None = None) -> tuple[Path, Manifest] | None:
    """(base directory, Manifest of the validation shards) or None when there is no split and no validation_dir."""
    if validation_dir:
        vdir = Path(validation_dir)
        if vdir.resolve() == Path(shard_dir).resolve():
            raise ValueError(f"data.validation_dir {vdir} is the training shard directory: validating on training "
                             "data measures memorisation; give the held-out shards' directory")
        return vdir, load_manifest(vdir)
    manifest = load_manifest(shard_dir)
    held_out = manifest.validation_manifest()
    return (Path(shard_dir), held_out) if held_out is not None else None


def validation_shard_paths(shard_dir: str | Path, validation_dir: str | Path | None = None) -> list[Path]:
    """The validation shard files (empty when there is no split)."""
    split = validation_split(shard_dir, validation_dir)
    return [] if split is None else [split[0] / s.file for s in split[1].shards]


def subset_size(manifest: Manifest, max_samples: int | None, world_size: int) -> int:
    """Samples evaluated: the first min(max_samples, all), trimmed to a multiple of the world size."""
    total = manifest.total_samples if max_samples is None else min(max_samples, manifest.total_samples)
    n = total - total % world_size
    if n == 0:
        raise ValueError(f"the validation split has {manifest.total_samples} samples, fewer than the {world_size} "
                         "ranks: hold out more documents (data_prep --validation-fraction) or evaluate on fewer ranks")
    return n


def rank_batches(n: int, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's micro-batches of sample indices [0, n): the same count on every rank, none empty."""
    per_rank = math.ceil(n / (micro_batch_size * world_size))
    parts = np.array_split(np.arange(n, dtype=np.int64), per_rank * world_size)
    return parts[rank::world_size]


def read_samples(base: Path, manifest: Manifest, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``indices`` (global, in manifest order; sorted) of the split's shards."""
    names = list(_KEYS) if manifest.masking == "static" else ["input_ids", "input_mask", "segment_ids",
                                                              "next_sentence_labels"]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    start = 0
    for info in manifest.shards:
        end = start + info.samples
        rows = indices[(indices >= start) & (indices < end)] - start
        if rows.size:
            with open_shard(base / info.file) as f:
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                for name in names:
                    out[name].append(f[name][lo:hi][rows - lo])  # one contiguous read, then pick
        start = end
    return {n: np.concatenate(v) for n, v in out.items()}


def validation_batches(base: str | Path, manifest: Manifest, *, micro_batch_size: int, rank: int, world_size: int,
                       max_samples: int | None = None, seed: int = 0, masked_lm_prob: float = 0.15,
                       max_predictions: int | None = None, vocab_size: int | None = None,
                       mask_token_id: int | None = None, special_token_ids: Iterable[int] = ()) -> Iterator[dict]:
    """This rank's micro-batches (dicts of torch.long tensors, the training loader's keys) of the fixed subset.
    The masking arguments matter only for unmasked (dynamic) shards."""
    base = Path(base)
    n = subset_size(manifest, max_samples, world_size)
    for idx in rank_batches(n, micro_batch_size, rank, world_size):
        arrays = read_samples(base, manifest, idx)
        if manifest.masking != "static":
            if mask_token_id is None or not (vocab_size or manifest.vocab_size) or not (
                    max_predictions or manifest.max_predictions):
                raise ValueError("validation shards without masks need mask_token_id, vocab_size and max_predictions")
            ids, positions, lm_ids = mask_batch(
                arrays["input_ids"], arrays["input_mask"], arrays["segment_ids"], idx, seed=seed, epoch=0,
                masked_lm_prob=masked_lm_prob, max_predictions=max_predictions or manifest.max_predictions,
                vocab_size=vocab_size or manifest.vocab_size, mask_token_id=mask_token_id,
                special_token_ids=special_token_ids)
            arrays.update(input_ids=ids, masked_lm_positions=positions, masked_lm_ids=lm_ids)
        yield {_KEYS[k]: torch.from_numpy(np.ascontiguousarray(v)).long() for k, v in arrays.items()}
