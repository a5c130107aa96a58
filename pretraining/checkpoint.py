"""Checkpoints that are complete or ignored: DeepSpeed's files + our client state + a completion marker written last.

Layout of ``<output_dir>/checkpoints``::

    step_00000100/                  one DeepSpeed tag (save_checkpoint(save_dir, tag), any ZeRO stage)
        mp_rank_00_model_states.pt  ... DeepSpeed's files, written by every rank
        hf/config.json, vocab.txt   model config + tokenizer files, so export needs nothing but this folder
        COMPLETE.json               written LAST, by rank 0, after every rank fsynced its files and a barrier
    latest_complete                 our pointer (human/tool convenience, written after the marker)

Why not DeepSpeed's ``latest``: rank 0 writes it with a plain write before the final barrier, so after a kill it can
name a checkpoint whose other ranks' files are missing. We never write it (``save_latest=False``) and never read it:
resume scans for the newest folder whose marker is present and whose recorded files still have their recorded sizes.
Retention renames an old folder to a dot-name before deleting it (a half-deleted folder can never look complete) and
never touches the newest complete checkpoint.

Client state: step, samples consumed (the global data position), skipped steps, every rank's RNG states (python, numpy,
torch, accelerator), plus what the caller adds. DeepSpeed stores the LR scheduler and optimizer itself.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.contract import atomic_write_text
from pretraining import distributed as dist

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
POINTER = "latest_complete"
HF_SUBDIR = "hf"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- scanning


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def check_complete(folder: str | os.PathLike) -> tuple[bool, str]:
    """(True, "") when the marker is present and every file it lists still has its recorded size."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return False, f"{folder}: no {MARKER} (the save did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return False, f"{marker}: unreadable marker: {e}"
    for name, size in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return False, f"{p}: missing or truncated (marker records {size} bytes)"
    return True, ""


def read_marker(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / MARKER).read_text())


def scan(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Complete checkpoint folders (oldest first) and the reasons the others are not complete."""
    root = Path(root)
    complete, problems = [], []
    if not root.is_dir():
        return complete, problems
    for p in sorted(root.iterdir()):
        if p.is_dir() and _TAG.match(p.name):
            ok, why = check_complete(p)
            (complete.append(p) if ok else problems.append(why))
    return complete, problems


def latest_complete(root: str | os.PathLike) -> Path | None:
    complete, problems = scan(root)
    for why in problems:
        log.warning("ignoring incomplete checkpoint: %s", why)
    return complete[-1] if complete else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from either a folder or a checkpoints root (-> newest complete); loud if incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    if _TAG.match(path.name) or (path / MARKER).exists() or any(path.glob("*_model_states.pt")):
        ok, why = check_complete(path)
        if not ok:
            raise ValueError(f"incomplete checkpoint, refusing to use it: {why}")
        return path
    found = latest_complete(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (no step_* folder with {MARKER})")
    return found


# ---------------------------------------------------------------- save / load


def save(engine, root: str | os.PathLike, step: int, client_state: dict, *, hf_config=None, tokenizer_dir=None,
         keep_last: int = 3) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder once it is complete on disk."""
    root = Path(root)
    tag = tag_for(step)
    folder = root / tag
    rank = dist.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # leftovers of an interrupted save of this very step: never mix old and new files
            _discard(folder)
    dist.barrier()
    state = dict(client_state, rng=dist.all_gather_object(capture_rng()), world_size=dist.world_size())
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    if rank == 0:
        hf = folder / HF_SUBDIR
        hf.mkdir(exist_ok=True)
        if hf_config is not None:
            hf_config.to_json_file(str(hf / "config.json"))
        if tokenizer_dir is not None:
            from pretraining.model import TOKENIZER_FILES

            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, hf / name)
    # Every rank makes everything durable (on one node the first fsync does the work, the others are no-ops);
    # the barrier then means: all files of all ranks are on disk.
    dist.barrier()
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)
    dist.barrier()
    if rank == 0:
        mark_complete(folder, step=step, samples_consumed=client_state.get("samples_consumed"),
                      world_size=dist.world_size(), zero_stage=int(engine.zero_optimization_stage()))
        atomic_write_text(root / POINTER, tag + "\n")
        _fsync_dir(root)
        prune(root, keep_last)
    dist.barrier()
    return folder


def mark_complete(folder: Path, **meta) -> None:
    """The last write of a save: the marker lists every file with its size (temp + fsync + rename, then dir fsync)."""
    meta = {"tag": folder.name, **meta, "time": time.time(), "files": _files(folder)}
    atomic_write_text(folder / MARKER, json.dumps(meta, indent=2))
    _fsync_dir(folder)


def _discard(folder: Path) -> None:
    # Rename first (atomic): a crash mid-delete must not leave a folder that still looks like a checkpoint.
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete folders older than the newest
    complete one. The newest complete checkpoint is never deleted."""
    root = Path(root)
    complete, _ = scan(root)
    if not complete:
        return []
    newest = complete[-1]
    doomed = complete[: -max(keep_last, 1)]
    for p in sorted(root.iterdir()):
        if p.is_dir() and _TAG.match(p.name) and p not in complete and p.name < newest.name:
            doomed.append(p)
    for p in doomed:
        _discard(p)
    for p in root.glob(".trash-*"):  # trash of an earlier crash
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def discard_incomplete(root: str | os.PathLike) -> list[str]:
    """Rank 0 before resuming: report and remove folders without a valid marker (their step will be redone)."""
    root = Path(root)
    _, problems = scan(root)
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and _TAG.match(p.name) and not check_complete(p)[0]:
            log.warning("removing incomplete checkpoint %s", p)
            _discard(p)
    return problems


def load(engine, folder: str | os.PathLike) -> dict:
    """Collective. Loads model/optimizer/scheduler into the engine, restores this rank's RNG; returns client state."""
    folder = Path(folder)
    ok, why = check_complete(folder)
    if not ok:
        raise ValueError(f"refusing to resume from an incomplete checkpoint: {why}")
    meta = read_marker(folder)
    world, stage = dist.world_size(), int(engine.zero_optimization_stage())
    if (meta["world_size"], meta["zero_stage"]) != (world, stage):
        raise ValueError(
            f"{folder} was saved by {meta['world_size']} ranks with ZeRO stage {meta['zero_stage']}; this run has "
            f"{world} ranks and stage {stage}; loading it would silently mis-assign optimizer partitions. Resume "
            f"with the same world size and stage, or export it (`python pretraining/export.py {folder} OUT`) and "
            f"start a new run with model.init=OUT (weights kept; optimizer moments restart). DeepSpeed's universal "
            f"checkpoint converter (deepspeed.checkpoint.ds_to_universal) is not wired in yet.")
    path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None or client_state is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    restore_rng(client_state["rng"][dist.rank()])
    return client_state
