"""A real one-node SLURM cluster in a temp dir, for tests that sbatch the real launch scripts.

slurmctld + slurmd run as root with auth/none and cred/none (no munge), proctrack/linuxproc, task/none, one node named by
`hostname` with this machine's CPU count. Ports are picked free so parallel CI jobs do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from biobert.files import free_port

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sacct")


def slurm_available() -> bool:
    return all(shutil.which(d) for d in DAEMONS[:4]) and os.geteuid() == 0


def slurm_conf(root: Path, name: str, *, ctld_host: str, per_node: str, kill_wait: int, nodes: str) -> str:
    """slurm.conf of a root-run test cluster under ``root`` (free ports, no munge, quick scheduling and requeue).
    ``per_node``: the suffix that keeps several slurmd's spool, pid and log files apart ("-%n"), "" for one node;
    ``nodes``: the NodeName and PartitionName lines."""
    r, n = root, per_node
    return f"""ClusterName={name}
SlurmctldHost={ctld_host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/none
CredType=cred/none
# a requeued job may start again only once its old credential expired (default 120 s): keep tests quick
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{n}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{n}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{n}.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait={kill_wait}
{nodes}
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        # jobs inherit this env (sbatch --export=ALL): never hand them a rendezvous left over from the test process
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        self.env = {**inherited, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        h = self.host
        self.conf.write_text(slurm_conf(
            self.root, "biobert-test", ctld_host=h, per_node="", kill_wait=30,
            nodes=f"NodeName={h} CPUs={os.cpu_count()} State=UNKNOWN\n"
                  f"PartitionName=debug Nodes={h} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"))

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        self.write_conf()
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"SLURM node did not come up: {tail}")

    def stop(self) -> None:
        """Cancel every job and wait for its processes, then shut the daemons down (slurmstepd would otherwise
        leave the jobs' processes running after the daemons are gone)."""
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user", "root"], env=self.env, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
            time.sleep(0.5)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        # slurmd waits for a step that will not die and removes its pid file early: finish by environment instead.
        # Every daemon, slurmstepd and job process of this cluster carries SLURM_CONF=<our conf>; nothing else does.
        deadline = time.time() + 10
        while (left := self._own_processes()) and time.time() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _own_processes(self) -> list[int]:
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def sbatch(self, script: str | os.PathLike, *args: str, script_args: tuple | list = (), env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> int:
        """Submit `script` with sbatch options `args` and job arguments `script_args`; `env` adds to the job's
        environment (sbatch exports the submitting environment). Returns the job id."""
        r = subprocess.run(
            ["sbatch", "--parsable", *args, str(script), *map(str, script_args)], env={**self.env, **(env or {})},
            capture_output=True, text=True, cwd=cwd,
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def show(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record: for an array job id, ask for 'ID_TASK')."""
        out = subprocess.run(
            ["scontrol", "show", "job", str(job_id)], env=self.env, capture_output=True, text=True
        ).stdout
        info: dict[str, str] = {}
        for field in out.split():
            key, sep, value = field.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def job_state(self, job_id: int | str) -> str:
        return self.show(job_id).get("JobState", "UNKNOWN")

    def signal(self, job_id: int | str, sig: str = "USR1", *, batch: bool = True) -> None:
        """scancel --signal: to the batch shell only (batch=True, what `#SBATCH --signal=B:` does) or the steps."""
        subprocess.run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)],
                       env=self.env, check=True, capture_output=True)

    def wait(self, job_id: int | str, timeout: float = 600.0,
             states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout}s\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        logs = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                logs.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-n:]))
        return "\n".join(logs)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
