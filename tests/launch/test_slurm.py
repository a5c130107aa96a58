"""The real sbatch scripts on a real one-node Slurm cluster (slurmctld + slurmd in a temp dir), CPU ranks, tiny model.

One cluster for the module, torn down at the end (also on failure). The data-prep array job's shards feed the
pretraining jobs; an uninterrupted run (deepspeed-launcher mode) is the reference the preempted run must reproduce.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_testlib import REPO, TINY_ENV, assert_continuous, read_metrics, run_overrides
from slurm_cluster import SlurmCluster, slurm_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_available(), reason="needs Slurm (slurm-wlm) and root to start it")]

MAX_STEPS = 30
PRETRAIN = REPO / "launch" / "slurm" / "pretrain.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def array_shards(cluster, corpus, tmp_path_factory) -> tuple[Path, int, Path]:
    """(shard dir, job id, log dir) of a 2-task data-prep array job over the 3-file corpus."""
    out, logs = tmp_path_factory.mktemp("array") / "shards", tmp_path_factory.mktemp("array_logs")
    job = cluster.sbatch(REPO / "launch" / "slurm" / "data_prep.sbatch", "--array=0-1", "-o", f"{logs}/prep-%a.out",
                         env={"INPUTS": str(corpus), "OUTPUT_DIR": str(out), "NUM_SHARDS": "1",
                              "PYTHON": sys.executable})
    for task in (0, 1):
        state = cluster.wait(f"{job}_{task}", timeout=180)
        assert state == "COMPLETED", f"task {task}: {state}\n{(logs / f'prep-{task}.out').read_text()}"
    return out, job, logs


def _job_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def test_data_prep_array_job_makes_valid_shards(array_shards, corpus):
    import json

    out, _, logs = array_shards
    r = subprocess.run([sys.executable, "-m", "biobert", "validate", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"].split("/")[0] for s in manifest["shards"]] == ["part-00000", "part-00001"]
    # every input file went to exactly one part, and the parts used different seeds
    parts = [json.loads((out / p / "manifest.json").read_text()) for p in ("part-00000", "part-00001")]
    used = sorted(Path(f).name for p in parts for f in p["settings"]["inputs"])
    assert used == sorted(p.name for p in corpus.iterdir())
    assert [p["seed"] for p in parts] == [12345, 12346]
    assert sum(s["samples"] for s in manifest["shards"]) == sum(p["shards"][0]["samples"] for p in parts) > 0
    logs_text = _job_log(logs / "prep-0.out") + _job_log(logs / "prep-1.out")
    assert "samples from 2 parts" in logs_text  # whichever task finished last merged (both may: it is idempotent)


def test_data_prep_mpi_job_matches_single_process(cluster, corpus, shards, tmp_path):
    """MODE=mpi: `mpirun -n 2` inside the allocation (Open MPI starts its daemons through Slurm); the shards are
    byte-identical to a one-process run with the same settings (data_prep's output depends only on its inputs)."""
    import json

    out = tmp_path / "shards"
    job = cluster.sbatch(REPO / "launch" / "slurm" / "data_prep.sbatch", "--ntasks=2", "-o", f"{tmp_path}/prep.out",
                         env={"MODE": "mpi", "INPUTS": str(corpus), "OUTPUT_DIR": str(out), "NUM_SHARDS": "2",
                              "PYTHON": sys.executable})
    state = cluster.wait(job, timeout=180)
    assert state == "COMPLETED", f"{state}\n{_job_log(tmp_path / 'prep.out')}"
    assert "data_prep over MPI: 2 ranks" in _job_log(tmp_path / "prep.out")
    mine = json.loads((out / "manifest.json").read_text())["shards"]
    single = json.loads((shards / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in mine] == [s["sha256"] for s in single] and len(mine) == 2


@pytest.fixture(scope="module")
def reference_run(cluster, array_shards, tmp_path_factory) -> Path:
    """2 ranks via one deepspeed launcher per node (MODE=deepspeed), MAX_STEPS uninterrupted."""
    shards, _, _ = array_shards
    out = tmp_path_factory.mktemp("ref") / "run"
    log = out.parent / "job.out"
    job = cluster.sbatch(PRETRAIN, "--ntasks-per-node=2", "-o", str(log),
                         script_args=run_overrides(shards, out, MAX_STEPS),
                         env={**TINY_ENV, "MODE": "deepspeed", "PYTHON": sys.executable})
    state = cluster.wait(job, timeout=300)
    assert state == "COMPLETED", f"{state}\n{_job_log(log)}\n{cluster.log_tail()}"
    return out


def test_two_rank_job_trains_with_deepspeed_launcher(reference_run):
    from pretraining.checkpoint import check_complete

    log = _job_log(reference_run.parent / "job.out")
    assert "world size     : 2" in log and f"{socket.gethostname()} slots=2" in log  # launch/env.py's derivation
    assert "--node_rank=0" in log  # one deepspeed launcher per node, started by srun (no ssh)
    records, summaries = read_metrics(reference_run)
    assert_continuous(records, MAX_STEPS)
    assert records[-1]["loss"] < records[0]["loss"]
    assert len(summaries) == 1 and summaries[0]["preempted"] is False
    assert check_complete(reference_run / "checkpoints" / f"step_{MAX_STEPS:08d}") == (True, "")


def test_preempted_job_requeues_and_resumes_where_it_stopped(cluster, array_shards, reference_run, tmp_path):
    """srun mode. SIGUSR1 to the batch shell mid-run (what `--signal=B:USR1@N` does before the time limit) ->
    forwarded to the ranks -> checkpoint + exit 75 -> scontrol requeue -> the requeued job resumes and finishes.
    The resumed curve equals the uninterrupted one step for step, so the data position continued exactly."""
    from pretraining.checkpoint import check_complete

    shards, _, _ = array_shards
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(PRETRAIN, "--ntasks-per-node=2", "-o", str(log),
                         script_args=run_overrides(shards, out, MAX_STEPS),
                         env={**TINY_ENV, "MODE": "srun", "PYTHON": sys.executable})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), _job_log(log)
        time.sleep(0.2)
    cluster.signal(job, "USR1", batch=True)
    state = cluster.wait(job, timeout=300)
    text = _job_log(log)
    assert state == "COMPLETED", f"{state}\n{text}\n{cluster.log_tail()}"
    assert cluster.show(job)["Restarts"] == "1", text
    assert "training step exited 75" in text and "requeueing job" in text

    records, summaries = read_metrics(out)
    assert [s["preempted"] for s in summaries] == [True, False]
    stopped_at = summaries[0]["final_step"]
    assert 3 <= stopped_at < MAX_STEPS
    assert_continuous(records, MAX_STEPS)  # no step lost or repeated across the requeue
    reference, _ = read_metrics(reference_run)
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert check_complete(out / "checkpoints" / f"step_{MAX_STEPS:08d}") == (True, "")


def _tiny_ner(root: Path) -> Path:
    """A few synthetic IOB2 sentences per split (token<TAB>label), enough for one short epoch."""
    diseases = [["breast", "cancer"], ["asthma"], ["type", "2", "diabetes"], ["leukemia"]]
    for split, n in (("train", 16), ("devel", 8), ("test", 8)):
        sents = []
        for i in range(n):
            d = diseases[i % len(diseases)]
            toks = ["Patients", "with", *d, "were", "studied", "."]
            labels = ["O", "O", "B-Disease", *["I-Disease"] * (len(d) - 1), "O", "O", "O"]
            sents.append("\n".join(f"{t}\t{lab}" for t, lab in zip(toks, labels)))
        (root / f"{split}.tsv").write_text("\n\n".join(sents) + "\n")
    return root


def test_finetune_sweep_array_writes_the_table(cluster, tmp_path):
    """1 lr x 2 seeds as a 2-task array: each task one run, the last one to finish writes sweep.json/md."""
    import json

    data = _tiny_ner(tmp_path)
    out = tmp_path / "sweep"
    job = cluster.sbatch(REPO / "launch" / "slurm" / "finetune.sbatch", "--array=0-1", "-o", f"{tmp_path}/ft-%a.out",
                         script_args=["--epochs", "1", "--max-seq-len", "32", "--window-overlap", "8",
                                      "--batch-size", "8", "--no-save-model"],
                         env={"TASK": "ner", "DATA": str(data), "OUTPUT_DIR": str(out), "LRS": "5e-5", "SEEDS": "1 2",
                              "DEVICE": "cpu", "PYTHON": sys.executable})
    for task in (0, 1):
        state = cluster.wait(f"{job}_{task}", timeout=240)
        assert state == "COMPLETED", f"{state}\n{_job_log(tmp_path / f'ft-{task}.out')}"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted((r["seed"], r["learning_rate"]) for r in sweep["runs"]) == [(1, 5e-5), (2, 5e-5)]
    for name in ("lr5e-05_seed1", "lr5e-05_seed2"):
        f1 = json.loads((out / name / "metrics.json").read_text())["f1"]
        assert 0.0 <= f1 <= 1.0
    row = sweep["table"][0]
    assert row["seeds"] == [1, 2] and row["f1"] == pytest.approx(sum(r["f1"] for r in sweep["runs"]) / 2)
    assert "| 5e-05 | 2 |" in (out / "sweep.md").read_text()
