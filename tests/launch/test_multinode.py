"""The real launch scripts across two Slurm nodes (tests/launch/slurm_nodes.py: 3 nodes x 2 CPUs on this machine, each
node its own network/hostname/mounts; jobs take 2 of them), CPU ranks, tiny BERT, ZeRO-2.

What a second node brings and is checked here: MASTER_ADDR from SLURM_JOB_NODELIST resolved on the other node, ranks
per node vs local rank, environment reaching remote ranks (a probe on PYTHONPATH records what each rank got), one
shared output directory (and the error when it is not), checkpoints written by ranks on different nodes, and a job
preempted twice -- by Slurm's own time-limit warning, then by `scancel --signal=USR1 --batch` -- that requeues,
resumes with rank 0 on another node and ends with every sample seen once and the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from launch_testlib import REPO, TINY_ENV, assert_continuous, read_metrics, run_overrides
from slurm_nodes import NodeCluster, namespaces_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not namespaces_available(), reason="needs Slurm (slurm-wlm), root, ip/nsenter/unshare to start a 3-node cluster")]

MAX_STEPS = 32  # x global batch 8 = 256 samples = the synthetic dataset: one epoch, every sample exactly once
PRETRAIN = REPO / "launch" / "slurm" / "pretrain.sbatch"
DATA_PREP = REPO / "launch" / "slurm" / "data_prep.sbatch"
PROBE = REPO / "tests" / "launch" / "env_probe"
# what the submitting shell sets and every rank, on every node, must get
FORWARDED = {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "LD_LIBRARY_PATH": "/opt/biobert-test/lib",
             "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    c = NodeCluster(root, nodes=3, cpus=2, node_local=[root / "scratch"])  # scratch: a different dir on each node
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """4 shards x 64 samples, seq 32, vocab 100 (its vocab.txt is the tokenizer)."""
    from benchmarks.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("synthetic") / "shards"
    write_synthetic_shards(out, num_shards=4, samples_per_shard=64, seq_len=32, max_predictions=5, vocab_size=100)
    return out


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _job_env(probe: Path, **extra) -> dict:
    probe.mkdir(parents=True, exist_ok=True)
    return {**TINY_ENV, "PYTHON": sys.executable, "PYTHONPATH": f"{PROBE}:{REPO}", "BIOBERT_PROBE_DIR": str(probe),
            **FORWARDED, **extra}


def _overrides(shards: Path, out: Path, max_steps: int = MAX_STEPS) -> list[str]:
    return [*run_overrides(shards, out, max_steps), f"model.tokenizer={shards}", "data.log_sample_ids=true"]


def _ranks_seen(probe: Path) -> list[dict]:
    """The probe's records of training/data-prep rank processes (not launchers), by global rank."""
    recs = [json.loads(p.read_text()) for p in probe.glob("*.json")]
    ranks = [r for r in recs if "deepspeed.launcher" not in r["cmd"] and "bash -c" not in r["cmd"]]
    for r in ranks:
        e = r["env"]
        # the innermost launcher's numbering first (biobert.dist's order): mpirun's ranks inside a Slurm job also
        # inherit the SLURM_* of the step that started mpirun or its daemon on their node
        r["rank"] = int(e.get("RANK", e.get("OMPI_COMM_WORLD_RANK", e.get("SLURM_PROCID", -1))))
        r["local"] = int(e.get("LOCAL_RANK", e.get("OMPI_COMM_WORLD_LOCAL_RANK", e.get("SLURM_LOCALID", -1))))
    return sorted(ranks, key=lambda r: (r["rank"], r["pid"]))


def _assert_placement_and_env(probe: Path, nodes: list[str]) -> None:
    """4 ranks, 2 per node in node order (rank = 2 * node index + local rank), each with the forwarded variables."""
    ranks = _ranks_seen(probe)
    assert [(r["rank"], r["host"], r["local"]) for r in ranks] == [
        (2 * i + local, node, local) for i, node in enumerate(nodes) for local in (0, 1)], ranks
    for r in ranks:
        assert _forwarded(r["env"]), f"rank {r['rank']} on {r['host']} got {r['env']}"


def _forwarded(env: dict) -> bool:
    """The submitted values arrived (a launcher may put its own library dir in front of LD_LIBRARY_PATH)."""
    got = {k: env.get(k, "") for k in FORWARDED}
    got["LD_LIBRARY_PATH"] = FORWARDED["LD_LIBRARY_PATH"] * (FORWARDED["LD_LIBRARY_PATH"] in
                                                            got["LD_LIBRARY_PATH"].split(":"))
    return got == FORWARDED and env.get("PYTHONPATH", "").split(":")[0] == str(PROBE)


def _sample_steps(out: Path) -> dict[int, list[int]]:
    """Global sample ids per step from the ranks' sample-id logs; fails if any micro-batch was logged twice."""
    from pretraining import sample_log

    steps, seen = defaultdict(list), set()
    for rank, records in sample_log.read(out).items():
        for rec in records:
            key = (rank, rec["step"], rec["micro"])
            assert key not in seen, f"rank {rank} logged step {rec['step']} micro {rec['micro']} twice"
            seen.add(key)
            steps[rec["step"]] += rec["ids"]
    return {s: sorted(ids) for s, ids in sorted(steps.items())}


# ---------------------------------------------------------------- data prep


def test_data_prep_array_tasks_on_two_nodes(cluster, corpus, vocab_dir, tmp_path):
    """2-task array, 2 CPUs per task: the tasks run on different nodes; each part is byte-identical to data_prep run
    here on the same share of the files with the same seed, and the last task merges both."""
    from data_prep.run import main, parse_args
    from launch import shard_parts as parts

    def prep(argv):
        return main(parse_args(argv))

    out = tmp_path / "shards"
    job = cluster.sbatch(DATA_PREP, "--array=0-1", "--cpus-per-task=2", "-o", f"{tmp_path}/prep-%a.out",
                         env={"INPUTS": str(corpus), "OUTPUT_DIR": str(out), "NUM_SHARDS": "1", "WORKERS": "1",
                              "PYTHON": sys.executable})
    hosts = []
    for task in (0, 1):
        state = cluster.wait(f"{job}_{task}", timeout=180)
        assert state == "COMPLETED", f"task {task}: {state}\n{_log(tmp_path / f'prep-{task}.out')}"
        hosts.append(cluster.show(f"{job}_{task}")["BatchHost"])
    assert len(set(hosts)) == 2, hosts
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"].split("/")[0] for s in manifest["shards"]] == ["part-00000", "part-00001"]
    for task in (0, 1):
        files = parts.slice_inputs([str(corpus)], task, 2)
        here = tmp_path / f"here-{task}"
        prep([*map(str, files), "--output-dir", str(here), "--vocab", str(vocab_dir), "--seed", str(12345 + task),
              "--num-shards", "1", "--workers", "1", "--no-progress"])
        there = json.loads((out / f"part-{task:05d}" / "manifest.json").read_text())["shards"]
        assert [s["sha256"] for s in there] == [s["sha256"] for s in json.loads(
            (here / "manifest.json").read_text())["shards"]]


def test_data_prep_mpi_across_two_nodes(cluster, corpus, shards, tmp_path):
    """MODE=mpi with one rank per node: mpirun inside the allocation starts its daemon on the second node through
    Slurm; the shards are byte-identical to one process with the same settings."""
    out, probe = tmp_path / "shards", tmp_path / "probe"
    job = cluster.sbatch(DATA_PREP, "--nodes=2", "--ntasks-per-node=1", "-o", f"{tmp_path}/prep.out",
                         env={**_job_env(probe), "MODE": "mpi", "INPUTS": str(corpus), "OUTPUT_DIR": str(out),
                              "NUM_SHARDS": "2"})
    state = cluster.wait(job, timeout=180)
    assert state == "COMPLETED", f"{state}\n{_log(tmp_path / 'prep.out')}"
    ranks, nodes = _ranks_seen(probe), cluster.nodes_of(job)
    assert len(nodes) == 2 and sorted((r["rank"], r["host"]) for r in ranks) == list(enumerate(nodes)), ranks
    mine = json.loads((out / "manifest.json").read_text())["shards"]
    single = json.loads((shards / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in mine] == [s["sha256"] for s in single] and len(mine) == 2


# ---------------------------------------------------------------- pretraining


def test_every_node_prints_its_part_of_the_plan(cluster, tmp_path):
    """`biobert plan` on each node of a 2 x 2 allocation: its ranks, and MASTER_ADDR (the first node) resolved there."""
    script = tmp_path / "plan.sh"
    script.write_text(f"#!/bin/bash\nsrun --ntasks=2 --ntasks-per-node=1 {sys.executable} -m biobert plan "
                      "--nproc-per-node 2\n")
    job = cluster.sbatch(script, "--nodes=2", "--ntasks-per-node=2", "-o", f"{tmp_path}/plan.out",
                         env={"NCCL_DEBUG": "WARN"})
    assert cluster.wait(job, timeout=60) == "COMPLETED", _log(tmp_path / "plan.out")
    text, (first, second) = _log(tmp_path / "plan.out"), cluster.nodes_of(job)
    assert f"node 0 {first}  ranks 0-1 (local 0-1)" in text and f"node 1 {second}  ranks 2-3 (local 0-1)" in text
    assert f"this node      : {first}: node 0, hosts ranks 0-1" in text
    assert f"this node      : {second}: node 1, hosts ranks 2-3" in text
    assert text.count(f"master       : {first} -> {cluster.addr[first]}") == 2 and "NCCL_DEBUG=WARN" in text


@pytest.fixture(scope="module")
def reference(cluster, synthetic, tmp_path_factory) -> Path:
    """MODE=srun, 2 nodes x 2 ranks, uninterrupted."""
    base = tmp_path_factory.mktemp("reference")
    out, log = base / "run", base / "job.out"
    job = cluster.sbatch(PRETRAIN, "--nodes=2", "--ntasks-per-node=2", "-o", str(log),
                         script_args=_overrides(synthetic, out), env=_job_env(base / "probe", MODE="srun"))
    state = cluster.wait(job, timeout=300)
    assert state == "COMPLETED", f"{state}\n{_log(log)}\n{cluster.log_tail()}"
    (base / "nodes.json").write_text(json.dumps(cluster.nodes_of(job)))
    return out


def test_two_nodes_srun_trains_with_ranks_on_both(reference):
    from pretraining.checkpoint import check_complete, read_marker

    base = reference.parent
    nodes = json.loads((base / "nodes.json").read_text())
    log = _log(base / "job.out")
    assert "world size     : 4" in log and f"master         : {nodes[0]}:" in log
    _assert_placement_and_env(base / "probe", nodes)
    records, summaries = read_metrics(reference)
    assert_continuous(records, MAX_STEPS)
    assert len(summaries) == 1 and summaries[0]["preempted"] is False
    final = reference / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert check_complete(final) == (True, "")
    # every rank reported its own files, from its own node; the marker lists exactly the folder's files
    marker = read_marker(final)
    assert [(r["rank"], r["host"]) for r in marker["ranks"]] == [(i, nodes[i // 2]) for i in range(4)]
    assert all(any(f.startswith(f"zero_pp_rank_{r['rank']}_") for f in r["files"]) for r in marker["ranks"])
    on_disk = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file() and p.name != "COMPLETE.json")
    assert sorted(marker["files"]) == on_disk
    steps = _sample_steps(reference)
    assert list(steps) == list(range(1, MAX_STEPS + 1)) and all(len(ids) == 8 for ids in steps.values())
    assert sorted(i for ids in steps.values() for i in ids) == list(range(256))  # one epoch: every sample once


def test_preempted_twice_requeues_resumes_on_other_nodes_and_matches(cluster, synthetic, reference, tmp_path):
    """MODE=deepspeed (one launcher per node, no ssh), submitted with an explicit --export list. Attempt 1 runs under
    `--time=2 --signal=B:USR1@30` (Slurm warns 60-90 s after the start, checking every 30 s): its ranks are held
    (SIGSTOP) from their first step until Slurm's own warning reaches the batch shell, as a slow step would hold them,
    so the signal lands mid-training whatever the machine's speed; its first node is drained meanwhile. Attempt 2 (time limit lifted, so Slurm does not signal again) runs on the other two
    nodes -- rank 0 elsewhere -- and is stopped by `scancel --signal=USR1 --batch`; attempt 3 runs to max_steps."""
    from pretraining.checkpoint import check_complete

    out, log, probe = tmp_path / "run", tmp_path / "job.out", tmp_path / "probe"
    env = _job_env(probe, MODE="deepspeed")
    exported = ["PATH", "HOME", *env]  # what a careful user lists; the steps must still get the script's own exports
    job = cluster.sbatch(PRETRAIN, "--nodes=2", "--ntasks-per-node=2", "--time=2", "--signal=B:USR1@30",
                         f"--export={','.join(exported)}", "-o", str(log), script_args=_overrides(synthetic, out),
                         env=env)
    metrics = out / "metrics.jsonl"
    attempts: list[list[str]] = []

    def running_or_requeued() -> bool:
        return cluster.job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    def steps_done() -> int:
        return sum(1 for line in metrics.read_text().splitlines() if '"step"' in line) if metrics.exists() else 0

    def hold_until_signalled(after_step: int, restarts: int, send: bool) -> None:
        """Freeze this attempt's ranks once they logged a step after `after_step`; signal (or wait for Slurm's
        signal: if it came during setup, the ranks stop at their first step by themselves); let them go."""
        deadline = time.time() + 240
        while steps_done() <= after_step or cluster.show(job).get("Restarts") != str(restarts):
            assert time.time() < deadline and running_or_requeued(), _log(log)
            time.sleep(0.1)
        pids = cluster.job_ranks(job)
        cluster.send(pids, signal.SIGSTOP)
        try:
            attempts.append(cluster.nodes_of(job))
            if restarts == 0:
                cluster.drain(attempts[0][0], "rank-0 node leaves before the requeue")
            if send:
                cluster.signal(job, "USR1", batch=True)
            while _log(log).count("SIGUSR1: asking the training ranks") <= restarts:
                assert time.time() < deadline and cluster.job_state(job) == "RUNNING", _log(log)
                time.sleep(0.2)
            # the batch shell forwards it to the held ranks (pending until they run); if it reached them just before
            # they were held, they have it already: then only a short wait
            until = time.time() + 15
            while not all(cluster.pending(pid, signal.SIGUSR1) for pid in pids) and time.time() < until:
                time.sleep(0.1)
        finally:
            cluster.send(pids, signal.SIGCONT)

    try:
        hold_until_signalled(0, restarts=0, send=False)  # Slurm's time-limit warning, not us
        cluster.update_job(job, TimeLimit="UNLIMITED")
        while cluster.show(job).get("Restarts") != "1":
            assert running_or_requeued(), _log(log)
            time.sleep(0.2)
        hold_until_signalled(steps_done(), restarts=1, send=True)
    finally:
        if attempts:
            cluster.resume(attempts[0][0])
    state = cluster.wait(job, timeout=300)
    text = _log(log)
    assert state == "COMPLETED", f"{state}\n{text}\n{cluster.log_tail()}"
    assert cluster.show(job)["Restarts"] == "2", text
    assert text.count("training step exited 75") == 2 and text.count("requeueing job") == 2
    assert attempts[0][0] not in attempts[1] and attempts[1][0] != attempts[0][0]  # rank 0 moved to another node

    records, summaries = read_metrics(out)
    assert [s["preempted"] for s in summaries] == [True, True, False]
    assert 1 <= summaries[0]["final_step"] < summaries[1]["final_step"] < MAX_STEPS
    assert_continuous(records, MAX_STEPS)  # no step lost or repeated across two requeues
    reference_records, _ = read_metrics(reference)
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference_records], rel=1e-5)
    assert _sample_steps(out) == _sample_steps(reference)  # the same samples at the same steps: each once
    assert check_complete(out / "checkpoints" / f"step_{MAX_STEPS:08d}") == (True, "")
    # every attempt's ranks had the forwarded environment: the probe files of the last attempt's ranks
    last = [r for r in _ranks_seen(probe) if r["host"] in attempts[-1]]
    assert len(last) >= 4 and all(_forwarded(r["env"]) for r in last)


def test_output_dir_not_shared_fails_before_step_1_naming_the_node(cluster, synthetic, tmp_path):
    """output_dir on node-local storage (the same path, a different directory on each node): every rank stops at
    start with the shared-directory error naming the other node; nothing is trained or saved."""
    out, log = cluster.root / "scratch" / "run", tmp_path / "job.out"
    job = cluster.sbatch(PRETRAIN, "--nodes=2", "--ntasks-per-node=2", "-o", str(log),
                         script_args=_overrides(synthetic, out), env=_job_env(tmp_path / "probe", MODE="srun"))
    state = cluster.wait(job, timeout=240)
    text = _log(log)
    first, second = cluster.nodes_of(job)
    assert state == "FAILED", text
    assert f"is not the same directory on every node: rank 0 (node {first})" in text
    assert "wrote .shared-check-" in text and f"but node {second} (ranks 2, 3): {out} does not exist there" in text
    assert "point output_dir at a shared filesystem" in text
    assert "run summary" not in text
    for node in cluster.names:  # no step record and no checkpoint on any node's copy
        local = cluster.root / f"scratch@{node}" / "run"
        assert not (local / "checkpoints").exists() and not (local / "metrics.jsonl").exists()


def test_mpi_sh_across_two_nodes_forwards_the_environment(cluster, synthetic, tmp_path):
    """launch/mpi.sh started on n1 with a two-host hostfile; Open MPI reaches n2 through an ssh-like agent that gives
    the remote side a bare login environment, so every variable the ranks show there came through mpi.sh's -x."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    env = {**_job_env(probe), "HOSTFILE": str(hostfile), "NP": "4", "MASTER_PORT": "29555",
           "MPI_ARGS": f"--prtemca plm_ssh_agent {cluster.agent}"}
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())  # as if set in a login shell on n1
    overrides = " ".join(map(shlex.quote, _overrides(synthetic, out, max_steps=8)))
    with open(tmp_path / "mpi.log", "w") as f:
        proc = cluster.on_node("n1", ["env", "-i", "HOME=/root", "PATH=/usr/bin:/bin", "bash", "-c",
                                      f"cd {REPO} && env {assignments} bash launch/mpi.sh {overrides}"],
                               stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = _log(tmp_path / "mpi.log")
    assert rc == 0, text
    assert "node 1 n2  ranks 2-3 (local 0-1)" in text and "LD_LIBRARY_PATH" in text
    _assert_placement_and_env(probe, ["n1", "n2"])
    records, summaries = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9)) and summaries[-1]["preempted"] is False
