"""Installed use: the wheel, in a fresh virtual environment outside the repository, from another directory.

The venv is new and holds only our wheel; its third-party dependencies (torch, DeepSpeed, transformers...) are borrowed
from the test interpreter's site-packages through a plain path entry (installing torch again would take minutes and
GBs). Our own packages come from the wheel alone: the checkout is neither on the path nor the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with our wheel installed."""
    work = tmp_path_factory.mktemp("installed")
    dist, src = work / "dist", work / "src"
    # Build from a copy of the project's files: setuptools' build/ in the checkout would keep modules deleted since
    # (and put them in the wheel), and a test should leave the checkout as it found it.
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("biobert_at_scale-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # dependencies only: a path entry does not run the editable-install hook of the checkout living there
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return venv / "bin"


def run(bin_dir: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{env.get('PATH', '')}")
    r = subprocess.run([str(bin_dir / "biobert"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"biobert {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_runs_every_stage_from_another_directory(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import biobert, pretraining, ds_configs; "
                            "print(biobert.__file__, pretraining.__file__, ds_configs.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where and "site-packages" in where  # our code comes from the wheel
    shipped = subprocess.run([str(installed / "python"), "-c", "from data_prep.demo import DEMO_PMC; "
                              "from launch.demo_ner import sample_dir; print(DEMO_PMC); print(sample_dir())"],
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    pmc, ner_sample = map(Path, shipped)  # the demo's real data travels in the wheel, with its sources
    assert "site-packages" in str(pmc) and len(list(pmc.glob("*.nxml.gz"))) == 5 and (pmc / "SOURCES.md").is_file()
    assert (ner_sample / "train.tsv").is_file() and (ner_sample / "SOURCE.md").is_file()

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(
        " ".join(f"Patient {i} received {drug} for {disease} and improved over {i % 7 + 2} weeks ." for i in range(12))
        for drug, disease in [("metformin", "diabetes"), ("aspirin", "pain"), ("insulin", "hyperglycemia")] * 4))
    vocab = subprocess.run([str(installed / "python"), "-c", "from pretraining.hub import packaged_model_dir; "
                            "print(packaged_model_dir())"], capture_output=True, text=True, check=True).stdout.strip()
    run(installed, "prep", corpus, "--output-dir", "shards", "--vocab", vocab, "--num-shards", "1", "--workers", "1",
        "--dupe-factor", "3", "--no-progress", cwd=tmp_path)
    run(installed, "validate", "shards", cwd=tmp_path)
    # a packaged recipe by name; relative paths resolve here, where the user stands
    run(installed, "pretrain", "--config", "tiny_cpu", "data.shard_dir=shards", "output_dir=run", "max_steps=2",
        "checkpoint.every_steps=2", "logging.progress_bar=false", "logging.tensorboard=false", cwd=tmp_path)
    assert (tmp_path / "run" / "checkpoints").is_dir()
    run(installed, "export", "run/checkpoints", "model", cwd=tmp_path)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    ner = tmp_path / "ner"
    ner.mkdir()
    sentence = "".join(f"{w}\t{t}\n" for w, t in [("aspirin", "O"), ("relieves", "O"), ("migraine", "B-Disease"),
                                                  (".", "O")]) + "\n"
    for split in ("train", "devel", "test"):
        (ner / f"{split}.tsv").write_text(sentence * 6)
    r = run(installed, "ner", "--model", "model", "--data", "ner", "--output-dir", "ner_out", "--epochs", "1",
            "--batch-size", "4", "--no-progress", "--num-threads", "1", cwd=tmp_path)
    assert "RESULT ner:" in r.stdout
    assert json.loads((tmp_path / "ner_out" / "metrics.json").read_text())["task"] == "ner"
