"""Is the output directory one directory for every rank? Proven at start, before anything is read or trained.

Every rank writes its own checkpoint files into ``<output_dir>/checkpoints``; rank 0 picks the checkpoint to resume
from, writes the completion marker and the metrics. On a cluster that is only right when output_dir is the same
directory on every node (NFS, Lustre, GPFS, ...), not node-local storage mounted at the same path, where each node
would silently train on, save and resume from its own copy. So, at start (``check``): rank 0 writes a token file
under a fresh random name, every rank opens that exact name and reads the token back, and the findings are
gathered, so every rank stops with the same message naming the nodes (and ranks) that do not see it.

Why a fresh name opened by name, never a directory listing: on NFS a listing may come from the client's cache (a
file another node just created is missing for up to acdirmax seconds), and so may a lookup that failed before (a
cached negative entry). A name no process on a node has looked up before is always asked of the server, and
close-to-open consistency delivers its content once the writer closed it. The checkpoint marker follows the same
rule (``pretraining.checkpoint.save``: each rank reports the files it wrote; rank 0 does not list the folder).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from biobert import dist

TOKEN_PREFIX = ".shared-check-"
FIX = ("every rank must see one shared directory (NFS, Lustre, GPFS, ...), not node-local storage mounted at the "
       "same path: point output_dir at a shared filesystem")


class SharedDirError(ValueError):
    """output_dir (or a checkpoint in it) is not the same on every node. The message names the nodes."""


def gather_problems(problem: str) -> list[tuple[int, str, str]]:
    """Collective: every rank's (rank, host, problem) -- problem "" when fine -- in rank order, on every rank."""
    return dist.all_gather_object((dist.rank(), socket.gethostname(), problem))


def by_node(reports: list[tuple[int, str, str]]) -> str:
    """'node n2 (ranks 2, 3): why; node n3 (rank 4): why' for the reports with a problem."""
    nodes: dict[str, tuple[list[int], str]] = {}
    for rank, host, problem in reports:
        if problem:
            nodes.setdefault(host, ([], problem))[0].append(rank)
    return "; ".join(f"node {host} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}): {why}"
                     for host, (ranks, why) in nodes.items())


def _read_token(path: Path, token: str, attempts: int, wait_s: float) -> str:
    """"" when `path` holds `token`; else why not. Retries a few times: a slow filesystem may need a moment."""
    why = ""
    for attempt in range(attempts):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            why = f"{path.name} does not exist there"
        except OSError as e:
            why = f"cannot read {path.name}: {e}"
        else:
            if text.split()[:1] == [token]:
                return ""
            why = f"{path.name} holds {text[:60]!r}, not the token rank 0 wrote"
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    if not path.parent.is_dir():
        why = f"{path.parent} does not exist there"
    return why


def check(directory: str | os.PathLike, *, attempts: int = 10, wait_s: float = 0.2) -> None:
    """Collective: raise SharedDirError on every rank unless every rank sees the file rank 0 writes in `directory`.
    Creates `directory` (rank 0). One process: nothing to prove."""
    if dist.world_size() == 1:
        return
    directory = Path(directory)
    rank, host = dist.rank(), socket.gethostname()
    token, failure = uuid.uuid4().hex, ""
    path = directory / f"{TOKEN_PREFIX}{token}"
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{token} written by rank 0 on {host}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            failure = f"rank 0 on {host} cannot write {path}: {e}"
    # the broadcast is also the barrier: the file is closed (and on disk) before any rank opens it
    token, failure = dist.broadcast_object((token, failure))
    if failure:
        raise SharedDirError(f"output_dir {directory}: {failure}")
    path = directory / f"{TOKEN_PREFIX}{token}"
    reports = gather_problems(_read_token(path, token, attempts, wait_s) if rank else "")
    if rank == 0:
        path.unlink(missing_ok=True)
    dist.barrier()  # returns with the token gone, on every rank
    if any(problem for _, _, problem in reports):
        raise SharedDirError(
            f"output_dir {directory} is not the same directory on every node: rank 0 (node {reports[0][1]}) wrote "
            f"{path.name} there, but {by_node(reports)}. {FIX[0].upper()}{FIX[1:]}.")
