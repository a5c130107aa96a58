"""Shard discovery and integrity: manifest (or one synthesised for NVIDIA-made shards), schema checks, full verification.

The cheap schema check (`schema_problems`) opens each file and compares datasets, dtypes, shapes and lengths with the
manifest; the loader runs it on every shard at construction. `verify_shards` adds what needs the bytes: sha256 against the
manifest (a flipped byte in HDF5 data can read back silently as a wrong id inside the vocab) and value ranges.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from data_prep import contract
from data_prep.contract import Manifest, ShardInfo

_PREDICTION_DATASETS = ("masked_lm_positions", "masked_lm_ids")
_VERIFY_ROWS = 8192  # rows per chunk when scanning values: bounds memory on any shard size


def open_shard(path: str | os.PathLike) -> h5py.File:
    """Read-only, without HDF5 file locking: shards are immutable once renamed into place, and cluster file systems
    without flock support (Lustre, some NFS) otherwise fail every open with "unable to lock file"."""
    return h5py.File(path, "r", locking=False)


class ShardProblem(str):
    """An error message (``"<path>: <problem>"``) that also carries the shard file name (``.file``, relative)."""

    file: str

    def __new__(cls, file: str, path: str | os.PathLike, problem: str) -> ShardProblem:
        return cls._with_file(f"{path}: {problem}", file)

    @classmethod
    def _with_file(cls, message: str, file: str) -> ShardProblem:
        obj = super().__new__(cls, message)
        obj.file = file
        return obj

    def __reduce__(self):  # keep .file through pickling (torch.distributed.all_gather_object)
        return (ShardProblem._with_file, (str(self), self.file))


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """The directory's manifest.json, or one synthesised from its *.hdf5/*.h5 files (NVIDIA shards: no checksums)."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"{shard_dir}: shard directory does not exist")
    if (shard_dir / contract.MANIFEST_NAME).is_file():
        manifest = Manifest.load(shard_dir)
        if not manifest.shards:
            raise ValueError(f"{shard_dir / contract.MANIFEST_NAME}: manifest lists no shards")
        return manifest
    return synthesise_manifest(shard_dir)


def synthesise_manifest(shard_dir: Path) -> Manifest:
    unfinished = [p.name for p in shard_dir.iterdir() if p.name.startswith(".shard-") and p.name.endswith(".done.json")]
    if unfinished or (shard_dir / ".work").is_dir():
        # data_prep writes manifest.json last: its sidecars without a manifest mean a killed run, not NVIDIA shards
        raise ValueError(f"{shard_dir}: an unfinished data_prep run (no {contract.MANIFEST_NAME}, but data_prep work "
                         "files are present); re-run the same data_prep command to finish it")
    files = sorted(p for p in shard_dir.iterdir() if p.suffix in (".hdf5", ".h5") and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{shard_dir}: no manifest.json and no *.hdf5 / *.h5 shard files")
    shards, layouts = [], set()
    for path in files:
        try:
            with open_shard(path) as f:
                ids = f["input_ids"]
                static = all(name in f for name in _PREDICTION_DATASETS)
                max_pred = f["masked_lm_positions"].shape[1] if static else 0
                layouts.add((ids.shape[1], max_pred, "static" if static else "dynamic"))
                shards.append(ShardInfo(file=path.name, samples=int(ids.shape[0]), tokens=0, sha256="", seq_len=ids.shape[1]))
        except (OSError, KeyError, IndexError) as e:
            raise ValueError(f"{path}: cannot read as a BERT shard (input_ids [N, L] expected): {e}") from None
    if len(layouts) != 1:
        raise ValueError(f"{shard_dir}: shards disagree on (seq_len, max_predictions, masking): {sorted(layouts)}")
    seq_len, max_pred, masking = layouts.pop()
    warnings.warn(
        f"{shard_dir}: no {contract.MANIFEST_NAME}; synthesised one from {len(files)} files "
        "(no checksums: bit flips go undetected; vocab hash unknown: pass vocab_size to verify_shards)",
        stacklevel=3,
    )
    return Manifest(
        seq_len=seq_len, max_predictions=max_pred, masking=masking, lower_case=False, vocab_hash="", vocab_size=0,
        seed=0, tool_version="unknown", settings={"synthesised": True}, shards=shards,
    )


def schema_problems(shard_dir: str | os.PathLike, manifest: Manifest, index: int) -> list[ShardProblem]:
    """Cheap checks of one shard (no data read): file present and non-empty, datasets, dtypes, shapes, equal lengths."""
    info = manifest.shards[index]
    path = Path(shard_dir) / info.file

    def problem(msg: str) -> list[ShardProblem]:
        return [ShardProblem(info.file, path, msg)]

    if not path.is_file():
        return problem("shard file is missing")
    size = path.stat().st_size
    if size == 0:
        return problem("shard file is empty (0 bytes)")
    try:
        f = open_shard(path)
    except OSError as e:
        return problem(f"not a readable HDF5 file (truncated or corrupt?): {e}")
    try:
        with f:
            return _dataset_problems(f, info, manifest, size, problem)
    except (OSError, KeyError, RuntimeError, ValueError) as e:  # damaged HDF5 metadata
        return problem(f"unreadable HDF5 structure (corrupt?): {type(e).__name__}: {e}")


def _dataset_problems(f: h5py.File, info: ShardInfo, manifest: Manifest, size: int, problem) -> list[ShardProblem]:
    out: list[ShardProblem] = []
    for name, (dtype, ndim) in contract.schema_for(manifest.masking).items():
        if name not in f or not isinstance(f[name], h5py.Dataset):
            out += problem(f"dataset {name!r} is missing ({manifest.masking} masking shards need it)")
            continue
        ds = f[name]
        if ds.dtype != dtype:
            out += problem(f"dataset {name!r} has dtype {ds.dtype}, expected {dtype}")
        if ds.ndim != ndim:
            out += problem(f"dataset {name!r} has shape {ds.shape}, expected {ndim} dimensions")
            continue
        if ds.shape[0] != info.samples:
            out += problem(f"dataset {name!r} has {ds.shape[0]} rows, manifest says {info.samples} samples")
        width = manifest.seq_len if name in contract.SEQUENCE_DATASETS else manifest.max_predictions
        if ndim == 2 and ds.shape[1] != width:
            out += problem(f"dataset {name!r} has shape {ds.shape}, expected [N, {width}]")
        # A contiguous dataset whose bytes end past the end of the file: the file was cut short.
        offset = ds.id.get_offset()
        if offset is not None and offset + ds.id.get_storage_size() > size:
            out += problem(f"dataset {name!r} extends past the end of the file ({size} bytes): truncated")
    return out


def _value_problems(path: Path, info: ShardInfo, manifest: Manifest, vocab_size: int) -> list[ShardProblem]:
    """Scan every row in chunks: ids within the vocab, positions within the sequence, 0/1 masks and labels, token count."""
    out: list[ShardProblem] = []

    def bad(msg: str) -> None:
        out.append(ShardProblem(info.file, path, msg))

    ranges = {"input_mask": 2, "segment_ids": 2, "next_sentence_labels": 2}
    static = manifest.masking == "static"
    if vocab_size > 0:
        ranges["input_ids"] = vocab_size
        if static:
            ranges["masked_lm_ids"] = vocab_size
    if static:
        ranges["masked_lm_positions"] = manifest.seq_len
    tokens = 0
    with open_shard(path) as f:
        for start in range(0, info.samples, _VERIFY_ROWS):
            stop = min(start + _VERIFY_ROWS, info.samples)
            for name, limit in ranges.items():
                chunk = f[name][start:stop]
                if chunk.size and (chunk.min() < 0 or chunk.max() >= limit):
                    row = start + int(np.argmax(((chunk < 0) | (chunk >= limit)).reshape(len(chunk), -1).any(axis=1)))
                    what = {"input_ids": "vocab_size", "masked_lm_ids": "vocab_size", "masked_lm_positions": "seq_len"}
                    bad(f"dataset {name!r} row {row}: values outside [0, {limit}) ({what.get(name, '0/1 flags')})")
                    ranges[name] = np.iinfo(np.int64).max  # report each dataset once
                if name == "input_mask":
                    tokens += int(chunk.sum(dtype=np.int64))
    if info.tokens and tokens != info.tokens:
        bad(f"{tokens} non-padding tokens, manifest says {info.tokens}")
    return out


def verify_shards(
    shard_dir: str | os.PathLike,
    manifest: Manifest | None = None,
    indices=None,
    *,
    vocab_size: int | None = None,
) -> list[str]:
    """Full verification of the shards at `indices` (default all): schema, sha256 vs manifest, value ranges.

    Returns error messages (``ShardProblem``: str with ``.file``), empty when all is well. Ranks can split the work:
    ``indices=range(rank, len(manifest.shards), world_size)`` and all-gather the lists. `vocab_size` defaults to the
    manifest's (pass the model's for NVIDIA shards, whose synthesised manifest does not know it).
    """
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    vocab_size = manifest.vocab_size if vocab_size is None else vocab_size
    indices = range(len(manifest.shards)) if indices is None else indices
    errors: list[str] = []
    for i in indices:
        info = manifest.shards[i]
        path = shard_dir / info.file
        problems = schema_problems(shard_dir, manifest, i)
        if problems:
            errors += problems
            continue
        if info.sha256:
            actual = contract.sha256_file(path)
            if actual != info.sha256:
                errors.append(ShardProblem(info.file, path, f"sha256 {actual} != manifest {info.sha256} (corrupted)"))
                continue
        try:
            errors += _value_problems(path, info, manifest, vocab_size)
        except OSError as e:
            errors.append(ShardProblem(info.file, path, f"read failed (truncated or corrupt?): {e}"))
    return errors


def check_vocab(manifest: Manifest, tokenizer_dir_or_vocab, model_vocab_size: int) -> None:
    """Raise ValueError when the shards were made with another vocab than the tokenizer's, or exceed the model's vocab."""
    if tokenizer_dir_or_vocab is not None:
        tokens = contract.read_vocab_tokens(tokenizer_dir_or_vocab)
        if manifest.vocab_hash:
            actual = contract.vocab_hash(tokens)
            if actual != manifest.vocab_hash:
                raise ValueError(
                    f"vocab mismatch: the shards were made with vocab hash {manifest.vocab_hash[:12]}... "
                    f"({manifest.vocab_size} tokens) but the tokenizer at {tokenizer_dir_or_vocab} has hash "
                    f"{actual[:12]}... ({len(tokens)} tokens): token ids would mean different words. "
                    "Re-create the shards with this tokenizer's vocab, or train with the tokenizer they were made with."
                )
        else:
            warnings.warn("shard manifest has no vocab hash (NVIDIA shards?): cannot check the tokenizer", stacklevel=2)
    shard_vocab = manifest.vocab_size
    if shard_vocab > model_vocab_size:
        raise ValueError(
            f"the shards' vocab has {shard_vocab} tokens but the model's embedding has only {model_vocab_size} rows: "
            "ids beyond it would index out of range. Use a model with a large enough vocab_size."
        )
