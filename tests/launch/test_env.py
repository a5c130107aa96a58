"""launch/env.py: Slurm hostlist / tasks-per-node parsing, hostfile derivation, master address and port."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch import env


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[08-11,20]", ["gpu08", "gpu09", "gpu10", "gpu11", "gpu20"]),
    ("a[1-2],b3,c[7]", ["a1", "a2", "b3", "c7"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("node-[098-101].ib", ["node-098.ib", "node-099.ib", "node-100.ib", "node-101.ib"]),
    ("x[1-2].cluster,y", ["x1.cluster", "x2.cluster", "y"]),
])
def test_expand_hostlist(text, hosts):
    assert env.expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1[", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="hostlist"):
        env.expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert env.expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert env.expand_tasks_per_node("2") == [2]
    with pytest.raises(ValueError):
        env.expand_tasks_per_node("2(x)")


def test_slurm_allocation_plan():
    plan = env.derive({"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_TASKS_PER_NODE": "4(x2),2",
                       "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert plan.scheduler == "slurm" and plan.hosts == ["gpu01", "gpu02", "gpu03"]
    assert plan.slots == [4, 4, 2] and plan.world_size == 10
    assert (plan.master_addr, plan.master_port) == ("gpu01", 20000 + 4242)
    assert plan.accelerator == "cuda"
    assert plan.hostfile == "gpu01 slots=4\ngpu02 slots=4\ngpu03 slots=2\n"
    shell = plan.shell()
    assert "export MASTER_ADDR=gpu01\n" in shell and "export NNODES=3\n" in shell and "DS_ACCELERATOR" not in shell


def test_slurm_plan_precedence_and_cpu():
    base = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "c[1-2]", "SLURM_NTASKS_PER_NODE": "2", "DEVICE": "cpu"}
    plan = env.derive(base)
    assert plan.slots == [2, 2] and plan.accelerator == "cpu" and "export DS_ACCELERATOR=cpu" in plan.shell()
    # explicit settings win over the allocation
    plan = env.derive({**base, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000"}, nproc_per_node=1)
    assert (plan.master_addr, plan.master_port, plan.slots) == ("10.0.0.5", 31000, [1, 1])
    # GPUs per node when Slurm gives no task layout
    plan = env.derive({"SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": "g1", "SLURM_GPUS_ON_NODE": "a100:8"})
    assert plan.slots == [8] and plan.accelerator == "cuda"
    with pytest.raises(ValueError, match="DEVICE"):
        env.derive({**base, "DEVICE": "tpu"})


def test_hostfile_plan(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nnodeA slots=4\nnodeB slots=4 # comment\nnodeC\n")
    assert env.read_hostfile(hf) == [("nodeA", 4), ("nodeB", 4), ("nodeC", 1)]
    plan = env.derive({"HOSTFILE": str(hf), "DEVICE": "cpu"})
    assert plan.scheduler == "hostfile" and plan.world_size == 9 and plan.master_addr == "nodeA"
    assert env.read_hostfile(hf) == [(h, s) for h, s in zip(plan.hosts, plan.slots)]  # hostfile round trip
    (tmp_path / "bad").write_text("nodeA slots=four\n")
    with pytest.raises(ValueError, match="bad:1"):
        env.read_hostfile(tmp_path / "bad")


def test_local_plan():
    plan = env.derive({"DEVICE": "cpu", "NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert plan.scheduler == "local" and plan.slots == [2] and plan.master_addr == "127.0.0.1"
    assert 1024 < plan.master_port < 65536 and plan.accelerator == "cpu"  # one host: a free port
    assert env.derive({"CUDA_VISIBLE_DEVICES": "0,1,2"}).slots == [3]


def test_cli_writes_hostfile_and_checks_batch(tmp_path):
    """`biobert plan` in a (simulated) 2-node allocation: hostfile written, batch split shown, bad world size refused
    with one line and exit 2; --hostfile reads a hostfile and never writes it."""
    job = {"SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "2", "DEVICE": "cpu",
           "PATH": "/usr/bin:/bin"}
    plan = [sys.executable, "-m", "biobert", "plan"]
    tiny = ["--config", "tiny_cpu"]
    r = subprocess.run([*plan, "--write-hostfile", str(tmp_path / "hf"), *tiny], cwd=tmp_path, env=job,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf").read_text() == "n1 slots=2\nn2 slots=2\n"
    assert "world size     : 4" in r.stdout and "micro 2 x accumulation 1 x 4 ranks" in r.stdout
    # 3 ranks per node: global batch 8 cannot be split over 6 ranks -> the engine's own message, one line, exit 2
    r = subprocess.run([*plan, "--nproc-per-node", "3", *tiny], cwd=tmp_path, env=job, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "world size 6" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*plan, "--shell"], cwd=tmp_path, env=job, capture_output=True, text=True)
    assert "export WORLD_SIZE_PLANNED=4" in r.stdout and "hosts" in r.stderr
    r = subprocess.run([*plan, "--json"], cwd=tmp_path,
                       env={**job, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"},
                       capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["process"] == {"rank": 3, "local_rank": 1, "world_size": 4, "launcher": "srun"}
    mine = tmp_path / "my_hosts"
    mine.write_text("gpuA slots=8\ngpuB slots=8\n")
    r = subprocess.run([*plan, "--hostfile", str(mine)], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "DEVICE": "cpu"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and "world size     : 16" in r.stdout
    assert mine.read_text() == "gpuA slots=8\ngpuB slots=8\n"  # read, not overwritten


def test_per_node_ranks_and_forwarded_environment(monkeypatch):
    plan = env.derive({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_TASKS_PER_NODE": "4(x2),2",
                       "DEVICE": "cpu"})
    assert plan.node_ranks() == [range(0, 4), range(4, 8), range(8, 10)]
    text = plan.describe()
    assert "node 0 gpu01  ranks 0-3 (local 0-3)  <- rendezvous (rank 0)" in text
    assert "node 2 gpu03  ranks 8-9 (local 0-1)" in text
    fwd = env.forwarded({"NCCL_IB_HCA": "mlx5", "LD_LIBRARY_PATH": "/x", "PYTHONPATH": "/p", "OMP_NUM_THREADS": "1",
                         "BIOBERT_DATA": "/d", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0,1", "TMPDIR": "/t",
                         "HOME": "/h", "HF_TOKEN": "secret"})
    assert list(fwd) == ["BIOBERT_DATA", "DS_ACCELERATOR", "HF_TOKEN", "LD_LIBRARY_PATH", "NCCL_IB_HCA",
                         "OMP_NUM_THREADS", "PYTHONPATH"]  # per-node and launch-node-only values stay behind
    # what a node of the plan sees: its ranks, the master's address from there, the values (secrets masked)
    monkeypatch.setattr(env.socket, "gethostname", lambda: "gpu02.cluster")
    view = env.LaunchPlan("slurm", ["gpu01", "gpu02"], [2, 2], "127.0.0.1", 29500, "cpu").node_view(
        {"NCCL_DEBUG": "INFO", "HF_TOKEN": "secret"})
    assert (view["node"], view["ranks"], view["master_resolves_to"]) == (1, [2, 3], ["127.0.0.1"])
    line = env.LaunchPlan("slurm", ["gpu01", "gpu02"], [2, 2], "no-such-host.invalid", 29500, "cpu").describe_node(
        {"NCCL_DEBUG": "INFO", "HF_TOKEN": "secret"})
    assert "gpu02.cluster: node 1, hosts ranks 2-3" in line and "no-such-host.invalid -> does not resolve" in line
    assert "HF_TOKEN=*** NCCL_DEBUG=INFO" in line and "secret" not in line


def test_forward_names_cli_is_what_mpi_sh_passes():
    r = subprocess.run([sys.executable, "-m", "biobert", "plan", "--forward-names"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "NCCL_SOCKET_IFNAME": "ib0", "CUDA_VISIBLE_DEVICES": "3",
                            "HOSTFILE": "/nonexistent"})  # a bad HOSTFILE does not matter for this question
    assert r.returncode == 0 and r.stdout.split() == ["NCCL_SOCKET_IFNAME", "PATH"]
