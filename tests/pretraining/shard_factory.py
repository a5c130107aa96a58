"""Tiny synthetic shards obeying data_prep/contract.py, plus the corruptions the integrity tests need.

The writer lives in benchmarks.synthetic (the loader benchmark uses it too); this module adds the faults.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from benchmarks.synthetic import MASK_ID, SPECIAL_IDS, write_synthetic_shards
from data_prep import contract

__all__ = ["MASK_ID", "SPECIAL_IDS", "write_synthetic_shards", "rewrite_shard", "flip_byte", "truncate"]


def rewrite_shard(shard_dir: Path, file: str, mutate, refresh_manifest: bool = True) -> None:
    """Rewrite one shard through `mutate(arrays: dict) -> dict` (a writer bug, not disk damage: the manifest's sha256
    is refreshed so only the content checks can catch it)."""
    path = Path(shard_dir) / file
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in f}
        attrs = dict(f.attrs)
    arrays = mutate(arrays)
    path.unlink()
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)
        f.attrs.update(attrs)
    if refresh_manifest and (Path(shard_dir) / contract.MANIFEST_NAME).is_file():
        manifest = contract.Manifest.load(shard_dir)
        for s in manifest.shards:
            if s.file == file:
                s.sha256 = contract.sha256_file(path)
        manifest.save(shard_dir)


def flip_byte(path: Path, dataset: str = "input_ids", row: int = 3) -> int | None:
    """Flip the low bit of one id inside a contiguous dataset's bytes (disk damage): h5py reads it back silently.
    Returns the id before the flip; for a chunked (compressed) dataset flips a byte mid-file and returns None."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.id.get_offset() is None:
            offset, before = Path(path).stat().st_size // 2, None
        else:
            offset = ds.id.get_offset() + row * ds.shape[1] * ds.dtype.itemsize + 4 * ds.dtype.itemsize
            before = int(ds[row, 4])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ 1]))
    return before


def truncate(path: Path, fraction: float = 0.5) -> None:
    size = Path(path).stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * fraction))


def set_values(name: str, value: int, row: int = 0, col: int = 1):
    """A mutate function for rewrite_shard: put `value` at arrays[name][row, col]."""

    def mutate(arrays: dict) -> dict:
        arr = np.array(arrays[name])
        arr[row, col] = value
        arrays[name] = arr
        return arrays

    return mutate
