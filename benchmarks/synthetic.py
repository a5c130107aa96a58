"""Synthetic shards that obey data_prep/contract.py, for tests and benchmarks (no corpus or tokenizer needed).

Samples look like BERT pairs: [CLS] A [SEP] B [SEP] then padding; most fill the sequence, `short_seq_prob` are
shorter (as create_pretraining_data does). The vocab is [PAD] [UNK] [CLS] [SEP] [MASK] tok5 tok6 ...
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from data_prep import contract
from pretraining.masking import mask_batch

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


def synthetic_vocab(vocab_size: int) -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(5, vocab_size)]


def synthetic_samples(
    n: int, seq_len: int, vocab_size: int, rng: np.random.Generator, short_seq_prob: float = 0.1
) -> dict[str, np.ndarray]:
    """Unmasked samples: {input_ids int32, input_mask int8, segment_ids int8, next_sentence_labels int8}."""
    lengths = np.full(n, seq_len, dtype=np.int64)
    short = rng.random(n) < short_seq_prob
    lengths[short] = rng.integers(8, seq_len + 1, size=int(short.sum()))
    sep_a = (lengths * rng.uniform(0.2, 0.8, size=n)).astype(np.int64).clip(2, lengths - 3)  # index of A's [SEP]
    pos = np.arange(seq_len)[None, :]
    input_ids = rng.integers(len(SPECIAL_IDS), vocab_size, size=(n, seq_len), dtype=np.int32)
    input_ids[:, 0] = CLS_ID
    rows = np.arange(n)
    input_ids[rows, sep_a] = SEP_ID
    input_ids[rows, lengths - 1] = SEP_ID
    real = pos < lengths[:, None]
    input_ids[~real] = PAD_ID
    segment_ids = (real & (pos > sep_a[:, None])).astype(np.int8)
    return {
        "input_ids": input_ids,
        "input_mask": real.astype(np.int8),
        "segment_ids": segment_ids,
        "next_sentence_labels": rng.integers(0, 2, size=n, dtype=np.int8),
    }


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict, compression: str | None = None) -> None:
    """Write one HDF5 shard under a temp name, then rename: a reader never sees a partial shard."""
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr, compression=compression)
        f.attrs.update(attrs)
    os.replace(tmp, path)


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    *,
    num_shards: int = 2,
    samples_per_shard: int | list[int] = 64,
    seq_len: int = 128,
    max_predictions: int = 20,
    masking: str = "static",
    vocab_size: int = 1000,
    masked_lm_prob: float = 0.15,
    seed: int = 0,
    manifest: bool = True,
    compression: str | None = None,
) -> contract.Manifest:
    """Shards `shard-0000i-of-0000n.hdf5`, `manifest.json` (unless manifest=False: NVIDIA-style) and `vocab.txt`.

    compression="gzip" writes chunked, compressed datasets as NVIDIA's create_pretraining_data does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [samples_per_shard] * num_shards if isinstance(samples_per_shard, int) else list(samples_per_shard)
    vocab = synthetic_vocab(vocab_size)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    vhash = contract.vocab_hash(vocab)
    rng = np.random.default_rng(seed)
    shards, first_id = [], 0
    for i, n in enumerate(sizes):
        arrays = synthetic_samples(n, seq_len, vocab_size, rng)
        if masking == "static":
            ids = np.arange(first_id, first_id + n)
            masked, positions, lm_ids = mask_batch(
                arrays["input_ids"], arrays["input_mask"], arrays["segment_ids"], ids, seed=seed, epoch=0,
                masked_lm_prob=masked_lm_prob, max_predictions=max_predictions, vocab_size=vocab_size,
                mask_token_id=MASK_ID, special_token_ids=SPECIAL_IDS,
            )
            arrays.update(input_ids=masked, masked_lm_positions=positions, masked_lm_ids=lm_ids)
        name = f"shard-{i:05d}-of-{len(sizes):05d}{contract.SHARD_SUFFIX}"
        attrs = dict(masking=masking, seq_len=seq_len, max_predictions=max_predictions, vocab_hash=vhash,
                     format_version=contract.FORMAT_VERSION)
        write_shard(out / name, arrays, attrs, compression)
        tokens = int(arrays["input_mask"].sum(dtype=np.int64))
        shards.append(contract.ShardInfo(name, n, tokens, contract.sha256_file(out / name), seq_len))
        first_id += n
    result = contract.Manifest(
        seq_len=seq_len, max_predictions=max_predictions, masking=masking, lower_case=True, vocab_hash=vhash,
        vocab_size=vocab_size, seed=seed, tool_version="synthetic",
        settings={"masked_lm_prob": masked_lm_prob, "mask_token_id": MASK_ID, "special_token_ids": list(SPECIAL_IDS)},
        shards=shards,
    )
    if manifest:
        result.save(out)
    return result
