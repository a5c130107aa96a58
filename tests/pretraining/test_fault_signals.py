"""Issue 5, test 3 (one rank; the 2-rank 'signal to one rank only' is in test_fault_multirank.py): a signal in the last
step finishes the run (exit 0), a signal during a save lets the save finish and then stops at once (exit 75), a signal
during setup stops cleanly at the first step boundary (also for `python pretraining/run.py`, whose handler is installed
before torch is imported); rank-to-device and rendezvous-port rules for bare srun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from subproc import kill_group

from pretraining import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py


def _usr1(*_):
    os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_during_last_step_finishes_with_exit_0(tmp_path, shards):
    from pretraining.trainer import main

    result = main(ef.synth_cfg(tmp_path, shards, 3, checkpoint={"every_steps": 0}),
                  on_step=lambda step, engine: step == 3 and _usr1())
    assert (result["step"], result["exit_code"], result["preempted"]) == (3, 0, False)
    assert result["checkpoint"].name == "step_00000003" and ckpt.check_complete(result["checkpoint"])[0]
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["preempted"] is False and summary["final_step"] == 3


def test_signal_during_save_finishes_it_then_stops(tmp_path, shards, monkeypatch):
    """SIGUSR1 arrives while step 2 is being saved: the save completes (handler only sets a flag), the run stops right
    after it (no step 3, no second save) with exit 75, and the resumed run equals the uninterrupted one."""
    from pretraining.trainer import main

    reference = main(ef.synth_cfg(tmp_path / "ref", shards, 4, checkpoint={"every_steps": 0}))
    cfg = ef.synth_cfg(tmp_path / "run", shards, 4, checkpoint={"every_steps": 2})
    monkeypatch.setattr(ckpt, "FAULT_HOOK", lambda phase: phase == "files_written" and _usr1())
    first = main(cfg)
    monkeypatch.setattr(ckpt, "FAULT_HOOK", None)
    assert (first["step"], first["exit_code"], first["preempted"]) == (2, 75, True)
    assert first["checkpoint"].name == "step_00000002" and ckpt.check_complete(first["checkpoint"]) == (True, "")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]
    second = main(cfg)
    assert second["resumed_from"].name == "step_00000002" and second["exit_code"] == 0
    assert first["losses"] + second["losses"] == reference["losses"]
    ef.assert_same_weights(ef.weights(second["engine"]), ef.weights(reference["engine"]))


def test_signal_before_training_stops_at_first_step(tmp_path, shards):
    """A signal caught during setup (run.py's early handler) is honoured, not lost: checkpoint at step 1, exit 75."""
    from pretraining import preemption
    from pretraining.trainer import main

    previous = preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
        result = main(ef.synth_cfg(tmp_path, shards, 5))
    finally:
        preemption.restore(previous)
    assert (result["step"], result["exit_code"]) == (1, 75) and result["checkpoint"].name == "step_00000001"
    assert not preemption.requested()  # consumed: the next run in this process starts clean


def _catches_sigusr1(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_run_py_survives_a_signal_during_its_imports(tmp_path, shards):
    run = ef.tiny_run(tmp_path / "out", shards, shards, max_steps=50)
    run["logging"] = {"progress_bar": False, "tensorboard": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cmd = [sys.executable, str(ef.REPO / "pretraining" / "run.py"), "--config", str(tmp_path / "run.yaml"),
           "--deepspeed_config", str(ef.TINY_DS)]
    proc = subprocess.Popen(cmd, env=ef.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not _catches_sigusr1(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert "torch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still importing: torch not even mapped yet
    proc.send_signal(signal.SIGUSR1)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 75, out[-3000:]
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1] and records[-1]["summary"]["preempted"] is True
    assert ckpt.check_complete(tmp_path / "out" / "checkpoints" / "step_00000001") == (True, "")


def test_cuda_device_index_under_gpus_per_task():
    from biobert.dist import cuda_device_index

    assert cuda_device_index(3, 1) == 0  # srun --gpus-per-task=1: the task sees only its own GPU
    assert cuda_device_index(3, 8) == 3 and cuda_device_index(9, 8) == 1
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_device_index(0, 0)


def test_default_port_derived_from_slurm_job_id():
    from biobert.dist import DEFAULT_PORT, default_port

    assert default_port({}) == DEFAULT_PORT
    a, b = default_port({"SLURM_JOB_ID": "123456"}), default_port({"SLURM_JOB_ID": "123457"})
    assert a == 20000 + 123456 % 20000 and a != b and 20000 <= a < 40000
