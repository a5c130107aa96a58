"""Checkpoints that are complete or ignored: DeepSpeed's files + our client state + a completion marker written last.

Layout of ``<output_dir>/checkpoints``::

    step_00000100/                  one DeepSpeed tag (save_checkpoint(save_dir, tag), any ZeRO stage)
        mp_rank_00_model_states.pt  ... DeepSpeed's files, written by every rank
        hf/config.json, vocab.txt   model config + tokenizer files, so export needs nothing but this folder
        COMPLETE.json               written LAST, by rank 0, once every rank reported its files written + fsynced
    latest_complete                 our pointer (human/tool convenience, written after the marker)
    latest                          DeepSpeed's pointer, also written after the marker (so its own zero_to_fp32.py
                                    and load_checkpoint(tag=None) work on these directories unchanged)

DeepSpeed's own way of writing ``latest`` (rank 0, a plain write, before the final barrier) could name a checkpoint
whose other ranks' files are missing after a kill, so DeepSpeed does not write it (``save_latest=False``): we write
it ourselves, atomically, only once the marker is in place. We never read it: resume scans for the newest folder whose
marker is present and whose recorded files still have their recorded sizes.
Retention renames an old folder to a dot-name before deleting it (a half-deleted folder can never look complete) and
never touches the newest complete checkpoint.

Client state: step, samples consumed (the global data position), skipped steps, every rank's RNG states (python, numpy,
torch, accelerator), plus what the caller adds. DeepSpeed stores the LR scheduler and optimizer itself.

Save phases (``SAVE_PHASES``, in order; ``FAULT_HOOK(phase)`` is called at each so tests can kill the process there):
start -> files_written -> synced (every rank fsynced the files it wrote and reported them: name, size, its host) ->
marker_temp (marker written + fsynced under a temp name) -> marked -> pruning. A death before ``marked`` leaves a
folder without marker (ignored, removed on resume); the previous complete checkpoint is untouched because retention
only runs after the new marker is in place.

The marker lists what the ranks *reported* (gathered over the process group), never what rank 0 finds by listing the
folder: on a shared filesystem such as NFS, rank 0's node can be served a cached listing that lacks a file another
node just wrote, and a marker built from it would vouch for a checkpoint with a file unaccounted for. A rank knows its
files because every DeepSpeed state file goes through ``engine.checkpoint_engine.save`` (recorded during the save)
and rank 0 writes ``hf/`` itself. Loading gathers every rank's view of the marker and its files first, so a node that
does not see the checkpoint stops every rank with its name instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from biobert import dist
from biobert.files import fsync_dir
from pretraining import shared_dir

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
POINTER = "latest_complete"
DS_POINTER = "latest"  # DeepSpeed's name; it reads the tag with .strip()
HF_SUBDIR = "hf"
_TAG = re.compile(r"^step_(\d{8,})$")
SAVE_PHASES = ("start", "files_written", "synced", "marker_temp", "marked", "pruning")
FAULT_HOOK = None  # tests: a callable(phase) run at each save phase (e.g. os.kill(os.getpid(), SIGKILL))


def _phase(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


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


def _atomic_write(path: Path, text: str, phase: str | None = None) -> None:
    """temp + fsync + rename + dir fsync, with a fault-injection point between fsync and rename. Unlike
    biobert.files.atomic_write it has no cleanup path on purpose: an exception injected at ``phase`` must leave
    exactly what a kill leaves (the fault tests rely on that)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if phase:
        _phase(phase)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(".")}


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
        raise FileNotFoundError(f"{path}: not a checkpoint and holds no complete one (no step_* folder with {MARKER}): "
                                "give a pretraining run's OUTPUT_DIR/checkpoints or one step_* folder in it")
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
    _phase("start")
    state = dict(client_state, rng=dist.all_gather_object(capture_rng()), world_size=dist.world_size())
    with _recording(engine) as mine:
        engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    if rank == 0:
        hf = folder / HF_SUBDIR
        hf.mkdir(exist_ok=True)
        if hf_config is not None:
            hf_config.to_json_file(str(hf / "config.json"))
            mine.append(hf / "config.json")
        if tokenizer_dir is not None:
            from pretraining.model import TOKENIZER_FILES

            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, hf / name)
                    mine.append(hf / name)
    _phase("files_written")
    # Each rank makes its own files durable and reports them; the gather returns once every rank has done so.
    reports = dist.all_gather_object(dict(rank=rank, host=socket.gethostname(), files=_make_durable(folder, mine)))
    _phase("synced")
    if rank == 0:
        files = {name: size for r in reports for name, size in r["files"].items()}
        mark_complete(folder, files=files, step=step, samples_consumed=client_state.get("samples_consumed"),
                      world_size=dist.world_size(), zero_stage=int(engine.zero_optimization_stage()),
                      ranks=[dict(rank=r["rank"], host=r["host"], files=sorted(r["files"])) for r in reports])
        _phase("marked")
        _atomic_write(root / POINTER, tag + "\n")
        _atomic_write(root / DS_POINTER, tag)
        prune(root, keep_last)
    dist.barrier()
    return folder


@contextmanager
def _recording(engine):
    """Yields the list of paths this rank's DeepSpeed engine saves while the block runs (all its state files go
    through checkpoint_engine.save: model states, ZeRO partitions, MoE experts)."""
    written: list[Path] = []
    engine_ = engine.checkpoint_engine
    save_fn = engine_.save

    def save(*args, **kwargs):
        out = save_fn(*args, **kwargs)
        written.append(Path(kwargs["path"] if "path" in kwargs else args[1]))
        return out

    own = vars(engine_).get("save")  # normally None: the method comes from the class
    engine_.save = save
    try:
        yield written
    finally:
        if own is None:
            del engine_.save
        else:
            engine_.save = own


def _make_durable(folder: Path, paths: list[Path]) -> dict[str, int]:
    """fsync each file and every directory from its parent up to `folder`; {name relative to folder: size}."""
    files, dirs = {}, {folder}
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
            files[str(p.relative_to(folder))] = os.fstat(f.fileno()).st_size
        dirs.update(d for d in p.parents if d.is_relative_to(folder))
    for d in sorted(dirs, key=lambda d: -len(d.parts)):  # entries first, then the directories holding them
        fsync_dir(d)
    return files


def mark_complete(folder: Path, files: dict[str, int] | None = None, **meta) -> None:
    """The last write of a save: the marker lists every file with its size (temp + fsync + rename, then dir fsync).
    `files`: what the ranks reported; None (one process wrote everything, e.g. tools and tests) lists the folder."""
    meta = {"tag": folder.name, **meta, "time": time.time(), "files": _files(folder) if files is None else files}
    _atomic_write(folder / MARKER, json.dumps(meta, indent=2), phase="marker_temp")


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
        _phase("pruning")
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


def load(engine, folder: str | os.PathLike, universal: bool = False) -> dict:
    """Collective. Loads model/optimizer/scheduler into the engine, restores this rank's RNG; returns client state.

    A checkpoint saved with another world size or ZeRO stage is refused unless ``universal`` (the engine was built
    with DeepSpeed's ``checkpoint.load_universal``): then it is converted with DeepSpeed's ds_to_universal (rank 0,
    into a temporary dot-folder next to it) and loaded from there, optimizer moments and schedule included."""
    folder = Path(folder)
    reports = shared_dir.gather_problems(check_complete(folder)[1])  # every rank's own view of it
    if all(why for _, _, why in reports):
        raise ValueError(f"refusing to resume from an incomplete checkpoint: {reports[0][2]}")
    if any(why for _, _, why in reports):
        raise shared_dir.SharedDirError(f"refusing to resume from {folder}: it is complete for rank 0 but not as "
                                        f"seen from {shared_dir.by_node(reports)}; {shared_dir.FIX}")
    meta = read_marker(folder)
    world, stage = dist.world_size(), int(engine.zero_optimization_stage())
    source = folder
    if (meta["world_size"], meta["zero_stage"]) != (world, stage):
        if not universal:
            raise ValueError(resharding_refusal(folder, meta, world, stage))
        if min(meta["zero_stage"], stage) < 1:
            raise ValueError(f"{folder}: DeepSpeed's universal checkpoint needs ZeRO stage 1-3 on both sides (saved "
                             f"with stage {meta['zero_stage']}, this run {stage}); use the export route instead:\n"
                             + resharding_refusal(folder, meta, world, stage))
        source = to_universal(folder)
    path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if source != folder:
        dist.barrier()
        if dist.rank() == 0:
            _discard(source)
        _resync_lr(engine)
    if path is None or client_state is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    if dist.rank() < len(client_state["rng"]):  # after a world-size change, new ranks keep their fresh seeds
        restore_rng(client_state["rng"][dist.rank()])
    engine.skipped_steps = int(client_state.get("overflow_steps_skipped", engine.skipped_steps))
    return client_state


def _resync_lr(engine) -> None:
    """DeepSpeed 0.19's universal load restores the scheduler's step count but leaves lr 0 in the optimizer's param
    groups (and the scheduler's last lr): recompute them from the restored step, as the scheduler itself would."""
    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "get_lr"):
        return
    import warnings

    with warnings.catch_warnings():  # get_lr() outside step() warns; here it is exactly what is wanted
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


def to_universal(folder: Path) -> Path:
    """Collective: rank 0 converts a ZeRO checkpoint with DeepSpeed's ds_to_universal (temp name + rename)."""
    out = folder.with_name(f".universal-{folder.name}")
    if dist.rank() == 0 and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = folder.with_name(f".universal-{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("converting %s (%s) to DeepSpeed's universal format in %s", folder, read_marker(folder), out)
        ds_to_universal(Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        os.replace(tmp, out)
    dist.barrier()
    return out


def resharding_refusal(folder: Path, meta: dict, world: int, stage: int) -> str:
    """Why a checkpoint saved with another world size / ZeRO stage is not loaded, and the exact way to continue."""
    samples = meta.get("samples_consumed")
    return (
        f"{folder} was saved by {meta['world_size']} ranks with ZeRO stage {meta['zero_stage']}; this run has "
        f"{world} ranks and ZeRO stage {stage}. Loading it would mis-assign the partitioned optimizer state, so it is "
        f"refused. Either resume with {meta['world_size']} ranks and stage {meta['zero_stage']}; or set "
        f"checkpoint.reshard=universal to convert it with DeepSpeed's universal checkpoint (ZeRO 1-3; keeps optimizer "
        f"state, schedule and data position); or convert by hand: "
        f"`biobert export {folder} OUT` (full fp32 weights), then start a new run with a new "
        f"output_dir (or checkpoint.resume=never) and `model.init=OUT data.start_sample={samples}` so the data "
        f"continues exactly after the {samples} samples already consumed (optimizer moments and the lr schedule "
        f"restart: set schedule.warmup_steps as wanted).")
