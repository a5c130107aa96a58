"""Phase 2: blocks -> balanced HDF5 shards (NVIDIA schema), written atomically, plus the manifest.

The global sample order is the blocks in a seed-shuffled order; shard k takes rows [k*N/S, (k+1)*N/S) of it
(sizes differ by at most one) and shuffles them. Every shard is a pure function of (blocks, seed, k), so any
process can write any shard. A finished shard gets a hidden `.done.json` sidecar; a re-run with the same
settings keeps shards whose sidecar and checksum agree, and `manifest.json` is written only when all are done,
so an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from biobert.files import atomic_output, atomic_write
from data_prep import contract
from data_prep.work import Block, load_block


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}{contract.SHARD_SUFFIX}"


def block_order(blocks: list[Block], seed: int, stream: int = 0) -> list[Block]:
    """Blocks in the global order: shuffled so neighbouring shards do not all come from neighbouring files.
    ``stream`` 1 = the validation split (its own random stream; 0 keeps the training order of earlier versions)."""
    perm = np.random.default_rng([seed, 0x5EED, *([stream] if stream else [])]).permutation(len(blocks))
    return [blocks[i] for i in perm]


def shard_ranges(total: int, num_shards: int) -> list[tuple[int, int]]:
    return [(k * total // num_shards, (k + 1) * total // num_shards) for k in range(num_shards)]


def gather_rows(ordered: list[Block], lo: int, hi: int, names) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of the global order, read from whichever blocks hold them."""
    parts = []
    start = 0
    for block in ordered:
        end = start + block.samples
        if end > lo and start < hi:
            parts.append(load_block(block, names, max(lo, start) - start, min(hi, end) - start))
        start = end
        if start >= hi:
            break
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


def write_shard(path: Path, arrays: dict[str, np.ndarray], masking: str, attrs: dict) -> contract.ShardInfo:
    """Write one shard under a temp name, fsync, checksum, then rename: a crash leaves no file with a real name."""
    schema = contract.schema_for(masking)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (dtype, _) in schema.items():
                f.create_dataset(name, data=np.ascontiguousarray(arrays[name], dtype=dtype))
            f.attrs.update({"masking": masking, "format_version": contract.FORMAT_VERSION, **attrs})
        info = contract.ShardInfo(
            file=path.name,
            samples=int(len(arrays["input_ids"])),
            tokens=int(np.count_nonzero(arrays["input_mask"])),
            sha256=contract.sha256_file(tmp),
            seq_len=int(arrays["input_ids"].shape[1]),
        )
    return info


def build_shard(out_dir: str, k: int, num_shards: int, ordered: list[Block], seed: int, masking: str, attrs: dict,
                fingerprint: str, stream: int = 0) -> contract.ShardInfo:
    """Shard k: gather its rows, shuffle them (seeded by k), write, and leave the sidecar."""
    total = sum(b.samples for b in ordered)
    lo, hi = shard_ranges(total, num_shards)[k]
    arrays = gather_rows(ordered, lo, hi, list(contract.schema_for(masking)))
    perm = np.random.default_rng([seed, 0x5A4D, k, *([stream] if stream else [])]).permutation(hi - lo)
    for n in arrays:  # one array at a time: peak memory stays ~1x the shard
        arrays[n] = arrays[n][perm]
    path = Path(out_dir) / shard_name(k, num_shards)
    info = write_shard(path, arrays, masking, attrs)
    atomic_write(_sidecar(path), json.dumps({"fingerprint": fingerprint, "shard": asdict(info)}))
    return info


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.done.json")


def completed_shard(out_dir: str, k: int, num_shards: int, fingerprint: str) -> contract.ShardInfo | None:
    """The ShardInfo of a shard a previous run finished with the same settings, if its bytes still match."""
    path = Path(out_dir) / shard_name(k, num_shards)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
        info = contract.ShardInfo(**data["shard"])
    except (ValueError, KeyError, TypeError):
        return None
    if data.get("fingerprint") != fingerprint or contract.sha256_file(path) != info.sha256:
        return None
    return info


def start_run(out_dir: str, fingerprint: str) -> None:
    """Make the directory visibly incomplete before anything is written: the manifest goes (its shards become
    sidecars when the settings match, so intact ones are reused) and shards no sidecar vouches for are removed,
    so a failed run never leaves old shards that a reader could take for a whole (manifest-less) dataset."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        old = contract.Manifest.load(out)
    except (FileNotFoundError, ValueError):
        old = None
    if old is not None and old.settings.get("fingerprint") == fingerprint:
        for info in old.shards + (old.validation.shards if old.validation else []):
            # sidecars hold the name within its directory, as build_shard writes it
            atomic_write(_sidecar(out / info.file),
                         json.dumps({"fingerprint": fingerprint, "shard": {**asdict(info), "file": Path(info.file).name}}))
    (out / contract.MANIFEST_NAME).unlink(missing_ok=True)
    for d in _shard_dirs(out):
        for f in d.glob(f"shard-*-of-*{contract.SHARD_SUFFIX}"):
            side = _sidecar(f)
            try:
                ok = json.loads(side.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                ok = False
            if not ok:
                f.unlink()
                side.unlink(missing_ok=True)
        for f in d.glob(f".shard-*{contract.SHARD_SUFFIX}.*.tmp"):  # left by a killed run
            f.unlink()


def _shard_dirs(out: Path) -> list[Path]:
    """The training shard directory and, when present, its validation subdirectory."""
    return [out] + ([out / contract.VALIDATION_DIR] if (out / contract.VALIDATION_DIR).is_dir() else [])


def abandon_run(out_dir: str) -> None:
    """After a reported failure, remove this run's shards: readers accept manifest-less directories of NVIDIA
    shards, so finished shards of a failed run must not stay behind. (A killed run cannot do this; its shards
    keep their hidden sidecars, which mark the directory as an unfinished data_prep run.)"""
    for d in _shard_dirs(Path(out_dir)):
        for f in d.glob(f"shard-*-of-*{contract.SHARD_SUFFIX}"):
            f.unlink()
        for f in d.glob(f".shard-*{contract.SHARD_SUFFIX}.done.json"):
            f.unlink()
        (d / contract.VALIDATION_DOCS).unlink(missing_ok=True)
    _remove_if_empty(Path(out_dir) / contract.VALIDATION_DIR)


def _remove_if_empty(d: Path) -> None:
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()


def finish(out_dir: str, manifest: contract.Manifest) -> None:
    """Write the manifest (the directory now looks complete), then drop sidecars and stale shards."""
    out = Path(out_dir)
    manifest.save(out)
    keep = {s.file for s in manifest.shards + (manifest.validation.shards if manifest.validation else [])}
    for d in _shard_dirs(out):
        for f in d.glob(f".shard-*{contract.SHARD_SUFFIX}.done.json"):
            f.unlink()
        for f in d.glob(f"shard-*-of-*{contract.SHARD_SUFFIX}"):
            if f.relative_to(out).as_posix() not in keep:  # from an earlier run with other settings
                f.unlink()
    if manifest.validation is None:  # a run without a split leaves no stale one behind
        (out / contract.VALIDATION_DIR / contract.VALIDATION_DOCS).unlink(missing_ok=True)
        _remove_if_empty(out / contract.VALIDATION_DIR)


def up_to_date(out_dir: str, fingerprint: str) -> contract.Manifest | None:
    """The existing manifest when a previous run with identical settings completed and its shards are intact."""
    try:
        manifest = contract.Manifest.load(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    if manifest.settings.get("fingerprint") != fingerprint:
        return None
    for s in manifest.shards + (manifest.validation.shards if manifest.validation else []):
        p = Path(out_dir) / s.file
        if not p.is_file() or contract.sha256_file(p) != s.sha256:
            return None
    if manifest.validation is not None and manifest.validation.documents_sha256 is not None:
        docs = Path(out_dir) / contract.VALIDATION_DIR / contract.VALIDATION_DOCS
        if not docs.is_file() or contract.sha256_file(docs) != manifest.validation.documents_sha256:
            return None
    return manifest
