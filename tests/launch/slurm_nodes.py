"""A real multi-node SLURM cluster on this one machine, for tests that sbatch the launch scripts across nodes.

Each node is a set of Linux namespaces holding one slurmd: its own network namespace (an address on a private
bridge, so ranks talk over a real interface, never loopback), its own hostname (UTS) and its own mount namespace,
where a private /etc/hosts names every node (the host's file is never edited) and `node_local` paths can be given a
per-node directory (the misconfiguration of an output dir that is not shared). slurmctld runs in the host namespace
on the bridge's address. Every job process runs inside its node's namespaces (slurmstepd inherits them from slurmd).
Torn down on stop() and on any start failure: jobs, daemons, every process left in a node, namespaces, bridge.

Why namespaces rather than `slurmd -N` twice on one network stack: every node would then share one hostname and
one loopback, so nothing would check that MASTER_ADDR resolves to the first node from the others, and Open MPI
would see one host. Needs root, `ip`, `nsenter`, `unshare` (util-linux).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import SlurmCluster, slurm_available, slurm_conf

PREFIX = "bbt"  # names of our bridges/veths/namespaces: bbt<pid>...; a dead pid's leftovers are removed at start


def namespaces_available() -> bool:
    return slurm_available() and all(shutil.which(t) for t in ("ip", "nsenter", "unshare"))


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _remove_stale() -> None:
    """Namespaces and links of a test process that died without tearing down (SIGKILL, OOM)."""
    names = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line]
    for ns in names:
        if ns.startswith(PREFIX) and "-" in ns:
            pid = ns[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _kill_namespace(ns)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        pid = name[len(PREFIX):-2] if name.startswith(PREFIX) else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _run("ip", "link", "del", name, check=False)


def _kill_namespace(ns: str) -> None:
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.time() + 10
    while _run("ip", "netns", "pids", ns, check=False).stdout.split() and time.time() < deadline:
        time.sleep(0.2)
    _run("ip", "netns", "del", ns, check=False)


def _free_subnet() -> str:
    """A 10.233.X.0/24 no interface of this machine uses (parallel CI jobs each pick their own)."""
    used = _run("ip", "-4", "-o", "addr", check=False).stdout
    for x in [os.getpid() % 200 + 20, *range(20, 250)]:
        if f"10.233.{x}." not in used:
            return f"10.233.{x}"
    raise RuntimeError("no free 10.233.X.0/24 subnet for the test cluster")


class NodeCluster(SlurmCluster):
    """`nodes` Slurm nodes n1..nN, `cpus` CPUs each in the config; see the module docstring."""

    def __init__(self, root: Path, nodes: int = 3, cpus: int = 2, node_local: tuple[str | os.PathLike, ...] = ()):
        super().__init__(root)
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.node_local = [Path(p) for p in node_local]
        self.tag = f"{PREFIX}{os.getpid()}"
        self.subnet = _free_subnet()
        self.addr = {name: f"{self.subnet}.{i}" for i, name in enumerate(self.names, 1)}
        self.gateway = f"{self.subnet}.254"  # the bridge: slurmctld and the test process reach the nodes here
        self.ns = {name: f"{self.tag}-{name}" for name in self.names}
        self.bridge = f"{self.tag}br"
        self.agent = self.root / "node-rsh"  # `ssh`-like entry into a node (Open MPI's plm_ssh_agent)

    # ------------------------------------------------------------ setup

    def write_conf(self) -> None:
        for d in ("state", "log", *(f"spool-{n}" for n in self.names)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN" for n, a in self.addr.items())
        self.conf.write_text(slurm_conf(
            self.root, "biobert-nodes", ctld_host=f"{self.host}({self.gateway})", per_node="-%n", kill_wait=10,
            nodes=f"{nodes}\nPartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP"))
        hosts = ["127.0.0.1 localhost", f"{self.gateway} {self.host}", *(f"{a} {n}" for n, a in self.addr.items())]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        self.agent.write_text(
            f"""#!/bin/bash
# node-rsh [ssh options] NODE COMMAND...: run COMMAND on a node of the test cluster the way sshd would: a login
# shell's minimal environment, nothing inherited from the caller (so launchers must forward what ranks need).
while [ "${{1#-}}" != "$1" ]; do case $1 in -o|-p|-l|-i|-F) shift 2 ;; *) shift ;; esac; done
node=$1; shift
pid=$(cat "{self.root}/slurmd-$node.pid") || exit 255
exec nsenter --target "$pid" --net --uts --mount -- env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/bash -c "$*"
"""
        )
        self.agent.chmod(0o755)

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names, 1):
            ns, veth = self.ns[name], f"{self.tag}v{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _start_slurmd(self, name: str) -> None:
        mounts = [f"mount --bind {self.root}/hosts /etc/hosts"]
        for path in self.node_local:  # this node's own directory at the shared path
            own = path.with_name(f"{path.name}@{name}")
            own.mkdir(parents=True, exist_ok=True)
            path.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {own} {path}")
        script = f"hostname {name} && {' && '.join(mounts)} && exec slurmd -f {self.conf} -N {name}"
        subprocess.run(["nsenter", f"--net=/run/netns/{self.ns[name]}", "unshare", "--uts", "--mount",
                        "--propagation", "private", "sh", "-c", script], env=self.env, check=True)

    def start(self, timeout: float = 60.0) -> NodeCluster:
        _remove_stale()
        try:
            self.write_conf()
            self._network()
            subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
            for name in self.names:
                self._start_slurmd(name)
            deadline = time.time() + timeout
            while time.time() < deadline:
                out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                                     text=True).stdout.split()
                states = dict(zip(out[::2], out[1::2]))
                if sorted(states) == sorted(self.names) and set(states.values()) == {"idle"}:
                    return self
                time.sleep(0.5)
            raise RuntimeError(f"SLURM nodes did not come up ({states}): {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------ teardown

    def stop(self) -> None:
        if self.conf.exists():
            super().stop()
        for ns in self.ns.values():
            if (Path("/run/netns") / ns).exists():
                _kill_namespace(ns)
        for i in range(1, len(self.names) + 1):  # the namespace's end goes with it, but not always at once
            _run("ip", "link", "del", f"{self.tag}v{i}", check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def log_tail(self, n: int = 20) -> str:
        logs = []
        for p in sorted((self.root / "log").glob("*.log")):
            logs.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(logs)

    # ------------------------------------------------------------ helpers for tests

    def on_node(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` inside node `name` (its network, hostname, mounts), as a login there would. kwargs: Popen's."""
        pid = (self.root / f"slurmd-{name}.pid").read_text().strip()
        return subprocess.Popen(["nsenter", "--target", pid, "--net", "--uts", "--mount", "--", *cmd], **kwargs)

    def nodes_of(self, job_id: int | str) -> list[str]:
        """The job's nodes in rank order (Slurm's hostlist, expanded)."""
        out = subprocess.run(["scontrol", "show", "hostnames", self.show(job_id).get("NodeList", "")],
                             env=self.env, capture_output=True, text=True).stdout
        return out.split()

    def drain(self, name: str, reason: str = "test") -> None:
        subprocess.run(["scontrol", "update", f"NodeName={name}", "State=DRAIN", f"Reason={reason}"],
                       env=self.env, check=True, capture_output=True)

    def resume(self, name: str) -> None:
        subprocess.run(["scontrol", "update", f"NodeName={name}", "State=RESUME"], env=self.env,
                       capture_output=True)

    def job_ranks(self, job_id: int | str) -> list[int]:
        """pids of the job's training ranks on any node: python running pretraining.run, not a launcher."""
        mark = f"SLURM_JOB_ID={job_id}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if (Path(argv[0].decode()).name.startswith("python")
                        and (b"pretraining/run.py" in argv or b"pretraining.run" in argv)
                        and b"deepspeed.launcher" not in b" ".join(argv)
                        and mark in (proc / "environ").read_bytes().split(b"\0")):
                    pids.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    @staticmethod
    def send(pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def pending(pid: int, sig: signal.Signals) -> bool:
        """Is `sig` waiting to be delivered to `pid` (e.g. while it is stopped)? A process that is gone counts."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True
        masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
        return any(m & (1 << (int(sig) - 1)) for m in masks)

    def update_job(self, job_id: int | str, **fields: str) -> None:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", *(f"{k}={v}" for k, v in fields.items())],
                       env=self.env, check=True, capture_output=True)

