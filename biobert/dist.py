"""Ranks and the launch rules, defined once: who am I (any launcher), where is rank 0, which port, which device.

Launchers and the variables they set (first match wins, so the launcher nearest the process goes first: mpirun
inside a Slurm job hands its ranks the SLURM_PROCID/SLURM_NTASKS of the batch step or of the srun that started its
daemon, which count those, not the ranks):
  deepspeed / torchrun / torch.distributed.run:  RANK, LOCAL_RANK, WORLD_SIZE (+ MASTER_ADDR/MASTER_PORT)
  mpirun (Open MPI):                             OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
  mpirun (MPICH / Intel MPI):                    PMI_RANK, MPI_LOCALRANKID, PMI_SIZE
  srun (Slurm):                                  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS
  plain `python`:                                one process; a private tcp:// rendezvous on a free local port
Rules every launch path shares (the shell scripts take them from `biobert plan --shell`):
  master address: $MASTER_ADDR, else the first host of the Slurm node list, else 127.0.0.1
  master port:    $MASTER_PORT, else 20000 + SLURM_JOB_ID % 20000 under Slurm (every node derives the same number; two
                  jobs sharing a node do not collide), else 29500
  CUDA device:    local rank modulo the visible devices (`srun --gpus-per-task=1` shows each task one GPU)
  accelerator:    $DS_ACCELERATOR, else $DEVICE (cpu | cuda), else cuda when a GPU is visible

torch is imported only inside the functions that need it: `biobert plan` and the batch scripts use the rules without it.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from biobert.files import free_port

_SOURCES = (  # (launcher, rank, local rank, world size)
    ("torchrun/deepspeed", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("srun", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),  # last: also inherited by ranks of mpirun in a job
)
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    for launcher, rank, local, world in _SOURCES:
        if rank in env and world in env:
            return DistEnv(int(env[rank]), int(env.get(local, 0)), int(env[world]), launcher)
    return DistEnv(0, 0, 1, "python")


# ---------------------------------------------------------------- launch rules


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, where: str) -> list[str]:
    out = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in hostlist {where!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {where!r}")
        width = len(lo)  # zero padding follows the lower bound, as Slurm does: [08-11] -> 08 09 10 11
        out.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm hostlist -> host names, in Slurm's order ('gpu[01-02],cpu[1,3]' -> gpu01 gpu02 cpu1 cpu3).
    Several bracket groups in one name expand as a product (rack[1-2]-n[1-2] -> rack1-n1 rack1-n2 rack2-n1 ...)."""
    hosts: list[str] = []
    for item in _split_top_level(text):
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_range(p[1:-1], text) if p.startswith("[") else [p] for p in pieces if p]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def slurm_nodelist(environ: dict | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""


def master_addr(environ: dict | None = None, hosts: list[str] | None = None) -> str:
    """$MASTER_ADDR, else the first host (of ``hosts`` or the Slurm node list), else 127.0.0.1."""
    env = os.environ if environ is None else environ
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if hosts is None:
        nodelist = slurm_nodelist(env)
        hosts = expand_hostlist(nodelist) if nodelist else []
    return hosts[0] if hosts else "127.0.0.1"


def default_port(environ: dict | None = None) -> int:
    """29500, or 20000 + SLURM_JOB_ID % 20000 under Slurm: every node of a job derives the same port without talking,
    and two jobs sharing a node do not collide."""
    job = (os.environ if environ is None else environ).get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def master_port(environ: dict | None = None) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("MASTER_PORT") or default_port(env))


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """`srun --gpus-per-task=1` shows each task only its own GPU (device_count 1) while SLURM_LOCALID counts tasks
    on the node: local rank modulo the visible devices picks the right one in both cases."""
    if device_count < 1:
        raise RuntimeError("CUDA accelerator selected but no CUDA device is visible to this process")
    return local_rank % device_count


def accelerator(environ: dict | None = None, gpus: int = 0) -> str:
    """cuda | cpu from $DS_ACCELERATOR, $DEVICE (auto | cpu | cuda | gpu), else whether a GPU is visible."""
    env = os.environ if environ is None else environ
    if env.get("DS_ACCELERATOR"):
        return env["DS_ACCELERATOR"]
    device = env.get("DEVICE", "auto").lower()
    if device in ("gpu", "cuda"):
        return "cuda"
    if device == "cpu":
        return "cpu"
    if device != "auto":
        raise ValueError(f"DEVICE={device!r}: expected auto, cpu or cuda")
    return "cuda" if gpus > 0 else "cpu"


# ---------------------------------------------------------------- process group


def init(timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (backend: nccl on CUDA, ccl/gloo on CPU). Idempotent."""
    from datetime import timedelta

    import torch

    d = discover()
    timeout = timedelta(minutes=timeout_minutes)
    if d.launcher == "python":
        # One process: a private tcp:// rendezvous on a free port, and no RANK/WORLD_SIZE exported, so processes
        # started from here (tests, mpirun from a notebook) do not inherit a stale "rank 0 of 1".
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine and ZeRO-3 read it
        if not torch.distributed.is_initialized():
            init_deepspeed_backend(timeout, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
        return d
    local = d.local_rank
    if torch.cuda.is_available():  # DeepSpeed's engine selects its device from LOCAL_RANK too
        local = cuda_device_index(d.local_rank, torch.cuda.device_count())
    os.environ.update(RANK=str(d.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(d.world_size))
    os.environ["MASTER_ADDR"] = master_addr()
    os.environ["MASTER_PORT"] = str(master_port())  # every rank must agree: derived, not random
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


def device():
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    return torch.device(name, acc.current_device()) if name != "cpu" else torch.device("cpu")


def _initialized() -> bool:
    import torch

    return torch.distributed.is_initialized()


def world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    import torch

    return torch.distributed.get_rank() if _initialized() else 0


def barrier() -> None:
    import torch

    if world_size() > 1:
        torch.distributed.barrier()


def all_gather_object(obj) -> list:
    import torch

    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    import torch

    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t):
    import torch

    if world_size() > 1:
        torch.distributed.all_reduce(t)
    return t
