"""Process-group wiring: rank discovery from any launcher, DeepSpeed init, and the few collectives the engine needs.

Launchers and the variables they set (first match wins):
  deepspeed / torchrun / torch.distributed.run:  RANK, LOCAL_RANK, WORLD_SIZE (+ MASTER_ADDR/MASTER_PORT)
  srun (Slurm):                                  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (master: first node of
                                                 SLURM_STEP_NODELIST/SLURM_JOB_NODELIST unless MASTER_ADDR is set)
  mpirun (Open MPI):                             OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
  mpirun (MPICH / Intel MPI):                    PMI_RANK, MPI_LOCALRANKID, PMI_SIZE
  plain `python`:                                one process; a private tcp:// rendezvous on a free local port
For launched ranks the discovered values are exported as RANK/LOCAL_RANK/WORLD_SIZE (torch's env:// rendezvous).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCES = (  # (launcher, rank, local rank, world size)
    ("torchrun/deepspeed", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("srun", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
)
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str


def discover(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    for launcher, rank, local, world in _SOURCES:
        if rank in env and world in env:
            return DistEnv(int(env[rank]), int(env.get(local, 0)), int(env[world]), launcher)
    return DistEnv(0, 0, 1, "python")


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[03-05,07],cpu1' -> 'gpu03' (enough of Slurm's hostlist syntax to find the first node)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return "127.0.0.1"
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (backend: nccl on CUDA, ccl/gloo on CPU). Idempotent."""
    from datetime import timedelta

    d = discover()
    timeout = timedelta(minutes=timeout_minutes)
    if d.launcher == "python":
        # One process: a private tcp:// rendezvous on a free port, and no RANK/WORLD_SIZE exported, so processes
        # started from here (tests, mpirun from a notebook) do not inherit a stale "rank 0 of 1".
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine and ZeRO-3 read it
        if not torch.distributed.is_initialized():
            init_deepspeed_backend(timeout, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
        return d
    local = d.local_rank
    if torch.cuda.is_available():  # DeepSpeed's engine selects its device from LOCAL_RANK too
        local = cuda_device_index(d.local_rank, torch.cuda.device_count())
    os.environ.update(RANK=str(d.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(d.world_size))
    if d.launcher == "srun" and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(
            os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(default_port()))  # every rank must agree: derived, not random
    if not torch.distributed.is_initialized():
        init_deepspeed_backend(timeout)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(cuda_device_index(d.local_rank, torch.cuda.device_count()))
    return d


def init_deepspeed_backend(timeout=None, **kwargs) -> None:
    """deepspeed.init_distributed, minus the CPU backend's JIT-built shared-memory op.

    On the CPU accelerator DeepSpeed compiles (or re-checks) that op in every process at init, under a lock *file* in
    TORCH_EXTENSIONS_DIR. A process killed inside that window (SIGKILL, OOM killer, scancel, a test timeout) leaves
    the file behind, and every later DeepSpeed start on the machine then waits on it forever, silently. Training
    never uses the op (only inference_all_reduce does), so on CPU it is not built at all."""
    import importlib
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # by module path: `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm.torch attr)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node, not once per rank
        warn_stale_extension_locks()
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timeout or timedelta(minutes=30), **kwargs)


def warn_stale_extension_locks(max_age_s: float = 600.0) -> list[str]:
    """Name torch-extension build locks older than max_age_s: a JIT build (e.g. FusedLamb on CUDA) whose process
    was killed leaves one, and the next build of that op waits on it forever without a word."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    stale = []
    for lock in sorted(Path(root).glob("*/*/lock")) + sorted(Path(root).glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue
        if age > max_age_s:
            stale.append(str(lock))
            print(f"WARNING: {lock} is {age / 60:.0f} min old: a killed JIT build left it, and DeepSpeed will wait "
                  f"on it forever when it builds that op. Remove it if no build is running.", flush=True)
    return stale


def default_port(environ: dict | None = None) -> int:
    """29500, or 20000 + SLURM_JOB_ID % 20000 under Slurm: two bare-srun jobs sharing a node must not collide
    (the same rule as launch/env.py)."""
    job = (os.environ if environ is None else environ).get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """`srun --gpus-per-task=1` shows each task only its own GPU (device_count 1) while SLURM_LOCALID counts tasks
    on the node: local rank modulo the visible devices picks the right one in both cases."""
    if device_count < 1:
        raise RuntimeError("CUDA accelerator selected but no CUDA device is visible to this process")
    return local_rank % device_count


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    return torch.device(name, acc.current_device()) if name != "cpu" else torch.device("cpu")


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        torch.distributed.all_reduce(t)
    return t
