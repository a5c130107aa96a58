"""`biobert plan`: what a launch will look like, derived before it spends GPU hours: hosts, ranks per node, world
size, master address/port, DeepSpeed hostfile, accelerator (and, given a recipe, the batch split for that world size).

    biobert plan                                          # inside `salloc`/sbatch, under mpirun, or on a laptop
    biobert plan --nproc-per-node 8 --hostfile hosts.txt  # read a DeepSpeed/Open MPI hostfile
    biobert plan --config RECIPE [k=v ...]                # + the global/micro/accumulation split, or exit 2
    biobert plan --shell --write-hostfile FILE            # `export ...` lines for a batch script to eval
    srun biobert plan --json                              # what each task would see (rank discovery)
    srun --ntasks=$SLURM_NNODES --ntasks-per-node=1 biobert plan --nproc-per-node 8
                                                          # each node: its ranks, where MASTER_ADDR leads from there
    biobert plan --forward-names                          # the variables launchers must pass to remote ranks

The plan lists, per node, the ranks it will host, and the environment every rank must get from the launching
shell (FORWARD_PREFIXES / FORWARD_NAMES: NCCL_*, LD_LIBRARY_PATH, PYTHONPATH, OMP_NUM_THREADS, the project's own
BIOBERT_* / DS_* ...). srun and the deepspeed launcher pass the whole environment; mpirun passes only what is
named with -x, which launch/mpi.sh takes from --forward-names. Run on a node of the plan, it adds what that node
sees: its node index and ranks, and the address MASTER_ADDR resolves to from there (a rank that cannot resolve or
reach it hangs at the rendezvous, so check this first when only some nodes start).

Sources, first match wins:
  hosts:          SLURM_JOB_NODELIST (Slurm hostlist syntax: gpu[01-04,07],rack[1-2]-n[1-2]) | --hostfile / $HOSTFILE
                  (DeepSpeed/Open MPI "host slots=N" lines) | this host
  ranks per node: --nproc-per-node / $NPROC_PER_NODE | SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE ("8(x4)") |
                  slots= in the hostfile | GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi -L) | 1
  master, port, accelerator: the rules of biobert.dist (one definition for every launcher and the ranks themselves);
                  on one host without Slurm the port is a free one
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from biobert import dist
from biobert.config import option, parse
from biobert.dist import DEFAULT_PORT, expand_hostlist
from biobert.errors import UserError, run
from biobert.files import atomic_write, free_port

# What every rank needs from the launching shell, also on other nodes (launch/mpi.sh -x's these; srun and the
# deepspeed launcher pass the whole environment). Per-node values (CUDA_VISIBLE_DEVICES, set on each node by the
# scheduler) and the launch node's TMPDIR are deliberately not copied.
FORWARD_PREFIXES = ("NCCL_", "UCX_", "FI_", "GLOO_", "TORCH_", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "KMP_", "HF_",
                    "TRANSFORMERS_", "TOKENIZERS_", "DS_", "BIOBERT_")
FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "VIRTUAL_ENV",
                 "MASTER_ADDR", "MASTER_PORT")
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES",)


# ---------------------------------------------------------------- Slurm syntax


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE syntax: '8(x2),4' -> [8, 8, 4]."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node value {text!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def read_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """DeepSpeed / Open MPI hostfile: 'host slots=N' per line, '#' comments; a host without slots= counts 1."""
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        host, *options = line.split("#", 1)[0].split() or [None]
        if host is None:
            continue
        slots = 1
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "slots":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"{path}:{n}: slots must be a positive integer, got {opt!r}")
                slots = int(value)
        hosts.append((host, slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def format_hostfile(hosts: list[str], slots: list[int]) -> str:
    return "".join(f"{h} slots={s}\n" for h, s in zip(hosts, slots))


def forwarded(environ: dict | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that every rank must get, sorted by name."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in sorted(env) if k not in NOT_FORWARDED
            and (k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES))}


def _shown(name: str, value: str) -> str:
    """A value for a log line: secrets masked (HF_TOKEN ...), long ones cut."""
    if any(word in name for word in ("TOKEN", "SECRET", "PASSWORD", "KEY")):
        return "***"
    return value if len(value) <= 40 else value[:37] + "..."


def _span(ranks: range) -> str:
    return f"{ranks.start}" if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


# ---------------------------------------------------------------- derivation


@dataclass(frozen=True)
class LaunchPlan:
    scheduler: str  # slurm | hostfile | local
    hosts: list[str]
    slots: list[int]  # ranks per host, same order
    master_addr: str
    master_port: int
    accelerator: str  # cuda | cpu
    job_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.hosts) != len(self.slots):
            raise ValueError(f"{len(self.hosts)} hosts but ranks-per-node given for {len(self.slots)}: "
                             f"{self.hosts} vs {self.slots}")
        if not self.hosts or min(self.slots) < 1:
            raise ValueError(f"need at least one host and one rank per host, got {self.hosts} {self.slots}")

    @property
    def world_size(self) -> int:
        return sum(self.slots)

    @property
    def nproc_per_node(self) -> int:
        """Ranks per node when uniform (what `deepspeed --num_gpus` and `torchrun` take); else the first node's."""
        return self.slots[0]

    @property
    def hostfile(self) -> str:
        return format_hostfile(self.hosts, self.slots)

    def node_ranks(self) -> list[range]:
        """Global ranks of each node, in host order (the block placement srun, mpirun --map-by slot and the deepspeed
        launcher all use: node i hosts the next slots[i] ranks; local rank = rank - first rank of its node)."""
        starts = list(itertools.accumulate([0, *self.slots]))
        return [range(a, b) for a, b in zip(starts, starts[1:])]

    def node_index(self, host: str) -> int | None:
        """This plan's index of `host` (also matching a short name against a qualified one); None if absent."""
        for name in (host, host.split(".")[0]):
            for i, h in enumerate(self.hosts):
                if name in (h, h.split(".")[0]):
                    return i
        return None

    def shell(self) -> str:
        values = dict(MASTER_ADDR=self.master_addr, MASTER_PORT=self.master_port, NNODES=len(self.hosts),
                      NPROC_PER_NODE=self.nproc_per_node, WORLD_SIZE_PLANNED=self.world_size,
                      LAUNCH_ACCELERATOR=self.accelerator)
        if self.accelerator == "cpu":
            values["DS_ACCELERATOR"] = "cpu"
        return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in values.items())

    def describe(self) -> str:
        uniform = len(set(self.slots)) == 1
        lines = [
            f"scheduler      : {self.scheduler}" + (f" (job {self.job_id})" if self.job_id else ""),
            f"hosts          : {len(self.hosts)}: {' '.join(self.hosts[:8])}{' ...' if len(self.hosts) > 8 else ''}",
            f"ranks per node : {self.nproc_per_node if uniform else self.slots}",
            f"world size     : {self.world_size}",
            f"master         : {self.master_addr}:{self.master_port}",
            f"accelerator    : {self.accelerator}" + (" (DS_ACCELERATOR=cpu)" if self.accelerator == "cpu" else ""),
            "hostfile       :",
            *("    " + line for line in self.hostfile.splitlines()),
            "per node       :",
        ]
        width = max(len(h) for h in self.hosts[:8])
        for i, (host, ranks) in enumerate(zip(self.hosts[:8], self.node_ranks())):
            lines.append(f"    node {i} {host:<{width}}  ranks {_span(ranks)} (local {_span(range(len(ranks)))})"
                         + ("  <- rendezvous (rank 0)" if i == 0 else ""))
        if len(self.hosts) > 8:
            lines.append(f"    ... {len(self.hosts) - 8} more nodes")
        return "\n".join(lines)

    def node_view(self, environ: dict | None = None) -> dict:
        """What this node will see: its place in the plan and where MASTER_ADDR leads from here."""
        env = os.environ if environ is None else environ
        host = socket.gethostname()
        index = self.node_index(host)
        if index is None and env.get("SLURM_NODEID", "").isdigit():
            index = int(env["SLURM_NODEID"])
        try:
            master = sorted({a[4][0] for a in socket.getaddrinfo(self.master_addr, self.master_port,
                                                                 type=socket.SOCK_STREAM)})
        except OSError as e:
            master = [f"does not resolve here ({e.strerror or e})"]
        ranks = self.node_ranks()[index] if index is not None and index < len(self.hosts) else None
        return dict(host=host, node=index, ranks=None if ranks is None else list(ranks), master_resolves_to=master,
                    gpus=_gpu_count(dict(env)), forwarded=forwarded(env))

    def describe_node(self, environ: dict | None = None) -> str:
        v = self.node_view(environ)
        place = (f"node {v['node']}, hosts ranks {_span(range(v['ranks'][0], v['ranks'][-1] + 1))}" if v["ranks"]
                 else "NOT in the plan's hosts (names must match `hostname`, or the ranks land elsewhere)")
        values = " ".join(f"{k}={_shown(k, val)}" for k, val in v["forwarded"].items()
                          if k not in ("PATH", "MASTER_ADDR", "MASTER_PORT"))
        return "\n".join([
            f"this node      : {v['host']}: {place}",
            f"  master       : {self.master_addr} -> {', '.join(v['master_resolves_to'])}",
            f"  GPUs visible : {v['gpus']}",
            f"  ranks get    : {values or '(none of the forwarded variables is set)'}",
        ])


def _gpu_count(env: dict) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            m = re.search(r"(\d+)\s*$", env[key])  # "4" or "a100:4"
            if m:
                return int(m.group(1))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return 0


def derive(environ: dict | None = None, nproc_per_node: int | None = None) -> LaunchPlan:
    """The launch plan from a Slurm allocation, a hostfile or this host (see the module docstring for precedence)."""
    env = dict(os.environ if environ is None else environ)
    if nproc_per_node is None and env.get("NPROC_PER_NODE"):
        nproc_per_node = int(env["NPROC_PER_NODE"])
    gpus = _gpu_count(env)
    job_id = env.get("SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        scheduler, hosts = "slurm", expand_hostlist(nodelist)
        if nproc_per_node:
            slots = [nproc_per_node] * len(hosts)
        elif env.get("SLURM_NTASKS_PER_NODE"):
            slots = [int(env["SLURM_NTASKS_PER_NODE"])] * len(hosts)
        elif env.get("SLURM_TASKS_PER_NODE"):
            slots = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        else:
            slots = [max(gpus, 1)] * len(hosts)
        default_addr = hosts[0]
        default_port = dist.default_port(env)
    elif env.get("HOSTFILE"):
        scheduler, job_id = "hostfile", None
        if not Path(env["HOSTFILE"]).is_file():
            raise UserError(f"hostfile {env['HOSTFILE']}: no such file (give a DeepSpeed/Open MPI hostfile: "
                            "'host slots=N' per line)")
        pairs = read_hostfile(env["HOSTFILE"])
        hosts = [h for h, _ in pairs]
        slots = [nproc_per_node or s for _, s in pairs]
        default_addr, default_port = (hosts[0] if len(hosts) > 1 else "127.0.0.1"), DEFAULT_PORT
    else:
        scheduler, job_id = "local", None
        hosts = [socket.gethostname()]
        slots = [nproc_per_node or max(gpus, 1)]
        # one host: nothing else has to agree on the port, so take a free one (two local runs cannot collide)
        default_addr, default_port = "127.0.0.1", free_port()
    return LaunchPlan(scheduler=scheduler, hosts=hosts, slots=slots,
                      master_addr=env.get("MASTER_ADDR") or default_addr,
                      master_port=int(env.get("MASTER_PORT") or default_port),
                      accelerator=dist.accelerator(env, gpus), job_id=job_id)


def batch_split(config: str, world_size: int, overrides: list[str] | None = None) -> str:
    """The batch split the engine will use at this world size; the engine's own error (ValueError) otherwise."""
    from pretraining.config import load_config  # yaml only: no torch import

    cfg = load_config(config, None, overrides)
    r = cfg.batch.resolved(world_size)
    return (f"global batch {r['train_batch_size']} = micro {r['train_micro_batch_size_per_gpu']} x accumulation "
            f"{r['gradient_accumulation_steps']} x {world_size} ranks; max_steps {cfg.max_steps} -> "
            f"{cfg.max_steps * r['train_batch_size']:,} samples; output {cfg.output_dir}")


def process_view() -> dict:
    """What biobert.dist discovers in this very process (run under srun/mpirun to see each rank)."""
    return asdict(dist.discover())


@dataclass(kw_only=True)
class PlanConfig:
    """What a launch will do here."""

    nproc_per_node: int | None = option(None, "ranks per node (default: derived)")
    hostfile: str | None = option(None, "read hosts and slots from this DeepSpeed/Open MPI hostfile (as $HOSTFILE)")
    write_hostfile: str | None = option(None, "write the derived DeepSpeed/Open MPI hostfile here")
    config: str | None = option(None, "a pretraining recipe (name or path): also check its batch split for this "
                                      "world size")
    overrides: list[str] = option(factory=list, help="the run's key=value overrides (they can change the batch)",
                                  positional=True)
    json: bool = option(False, "machine-readable, with this process's rank view")
    shell: bool = option(False, "`export` lines on stdout, the description on stderr")
    forward_names: bool = option(False, "print only the names of the set variables every rank must get (FORWARD_*), "
                                        "one per line (launch/mpi.sh passes them with -x)")


def main(cfg: PlanConfig) -> dict:
    if cfg.forward_names:
        print("".join(f"{name}\n" for name in forwarded()), end="")
        return {}
    environ = dict(os.environ)
    if cfg.hostfile:
        environ["HOSTFILE"] = cfg.hostfile
    plan = derive(environ, nproc_per_node=cfg.nproc_per_node)
    if cfg.write_hostfile:
        atomic_write(cfg.write_hostfile, plan.hostfile)
    split = batch_split(cfg.config, plan.world_size, cfg.overrides) if cfg.config else None
    if cfg.json:
        view = plan.node_view(environ)
        view["forwarded"] = {k: _shown(k, v) for k, v in view["forwarded"].items()}
        print(json.dumps(dict(asdict(plan), world_size=plan.world_size, hostfile=plan.hostfile, batch=split,
                              nodes=[list(r) for r in plan.node_ranks()], this_node=view, process=process_view()),
                         indent=2))
        return {"plan": plan, "batch": split}
    text = plan.describe() + f"\n{plan.describe_node(environ)}" + (f"\nbatch          : {split}" if split else "")
    print(text, file=sys.stderr if cfg.shell else sys.stdout)
    if cfg.shell:
        print(plan.shell(), end="")
    return {"plan": plan, "batch": split}


def cli(argv: list[str] | None = None) -> int:
    cfg = parse(PlanConfig, argv, prog="biobert plan", description=__doc__, config_file=False)
    if cfg.json and cfg.shell:
        raise UserError("--json and --shell: choose one")
    main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
