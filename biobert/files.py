"""Atomic outputs and a free port: the file rules every stage follows.

A name only ever refers to complete content: write under a temporary name in the same directory, fsync, rename. A
crash leaves a `.NAME.*.tmp` file (or dir), never something that looks finished. Files get 0644 (0755 dirs) minus the
umask, not mkstemp's 0600: on a shared cluster the next person must be able to read a model or a shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``, on error removed.

    For writers that need a path of their own (h5py, savefig, torch.save): ``with atomic_output(p) as tmp: f(tmp)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, durable: bool = True) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically."""
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def finite(obj):
    """``obj`` with NaN/inf floats as None: strict JSON has no spelling for them (Python's ``NaN`` breaks jq and JS)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, *, durable: bool = True) -> Path:
    """Strict JSON (non-finite numbers written as null), indented, atomically."""
    text = json.dumps(finite(obj), indent=2, default=str, allow_nan=False)
    return atomic_write(path, text + "\n", durable=durable)


def temp_dir_for(final: str | os.PathLike) -> Path:
    """A fresh temporary directory beside ``final`` (same filesystem, so publish_dir is a rename)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, replace: bool = True) -> Path:
    """Rename a finished temporary directory to ``final``. With ``replace`` an existing ``final`` is swapped out
    (renamed aside, then deleted), so ``final`` is at every moment either the old or the new complete directory."""
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, 0o777 & ~_umask())
    for child in tmp.rglob("*"):
        os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~_umask())
    if final.exists() and replace:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a private rendezvous on one host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
