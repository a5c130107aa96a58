"""The task entrypoints run under the deepspeed launcher (2 CPU ranks): batches split across ranks, rank 0 writes."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from subproc import run_group

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_re_under_deepspeed_launcher(minilm_dir, tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("deepspeed launcher not installed")
    data = tmp_path / "data"
    data.mkdir()
    rows = [("@GENE$ is associated with @DISEASE$ risk .", "1"), ("@GENE$ was not linked to @DISEASE$ .", "0")] * 8
    (data / "train.tsv").write_text("".join(f"{t}\t{lab}\n" for t, lab in rows))
    (data / "test.tsv").write_text("".join(f"{t}\t{lab}\n" for t, lab in rows[:4]))
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--module", "finetuning.relation", "--model", str(minilm_dir), "--data", str(data),
           "--output-dir", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress", "--num-threads", "1"]
    proc = run_group(cmd, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 16 examples, 4 per rank-batch, 2 ranks: 2 optimizer steps, every example seen once.
    assert metrics["train"]["steps"] == 2 and metrics["train"]["train_examples_seen"] == 16
    assert (out / "model/model.safetensors").is_file()
    assert len((out / "test_predictions.tsv").read_text().splitlines()) == 5
    assert proc.stdout.count("RESULT re:") == 1  # only rank 0 reports and writes
