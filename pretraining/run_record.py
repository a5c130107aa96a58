"""A run records itself: what was asked for, what ran, on what, from which code and data. Rank 0, at every start.

OUTPUT_DIR/
  run_config.yaml        the resolved run config (every layer applied): ``biobert pretrain --config`` it to repeat it
  deepspeed_config.json  the dict DeepSpeed was actually given (generated for this world size, precision plan applied)
  run_record.json        both of the above, plus: versions (python, torch, CUDA, deepspeed, transformers, ...), the
                         code's git commit (and whether the tree was dirty) when it runs from a git checkout, the
                         shards' manifest sha256 (of manifest.json as a file; of the synthesised manifest for
                         directories without one) and the validation split's, world size, launcher, hosts, devices,
                         what ran (attention path, optimizer, precision), the command, and ``starts``: one entry per
                         start of this output directory (time, step, resumed_from, world size, commit) so a run
                         resumed on other code or another world size says so.
Each file is written atomically. Nothing here may stop a run: what cannot be found is recorded as null.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from biobert.config import dump_yaml
from biobert.files import atomic_write, atomic_write_json

RECORD = "run_record.json"
RUN_CONFIG = "run_config.yaml"
DEEPSPEED_CONFIG = "deepspeed_config.json"
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "numpy", "h5py", "biobert-at-scale", "mlflow-skinny",
            "mlflow", "wandb", "tensorboard")
REPO = Path(__file__).resolve().parents[1]


def versions() -> dict:
    out: dict = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a record, not a check
        pass
    return out


def git_commit(root: Path = REPO) -> dict | None:
    """{commit, dirty} of the checkout the code runs from; None when it is not a git checkout (an installed wheel)."""
    if not (root / ".git").exists():
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty, "root": str(root)}
    except (OSError, subprocess.SubprocessError):
        return None


def manifest_fingerprint(shard_dir: str | Path | None) -> dict | None:
    """sha256 of the directory's manifest.json (as model_card.describe_corpus hashes it), or of the manifest
    synthesised from its files (NVIDIA shards: names, sizes and samples, not contents)."""
    if not shard_dir:
        return None
    path = Path(shard_dir) / "manifest.json"
    try:
        if path.is_file():
            return {"dir": str(shard_dir), "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "synthesised": False}
        from pretraining.data_shards import load_manifest

        text = load_manifest(shard_dir).to_json()
        return {"dir": str(shard_dir), "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "synthesised": True}
    except Exception as e:  # noqa: BLE001 - the trainer's preflight reports bad shards; here it is only a record
        return {"dir": str(shard_dir), "manifest_sha256": None, "error": f"{type(e).__name__}: {e}"}


def _previous_starts(path: Path) -> list:
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("starts", []))
    except (OSError, ValueError, AttributeError):
        return []


def write(out_dir: str | Path, cfg, ds_config: dict, *, world_size: int, launcher: str, step: int,
          resumed_from, run_info: dict, validation: str | None, command: list[str] | None) -> dict:
    """Write the three files (rank 0 only); returns the record."""
    from biobert import dist

    out = Path(out_dir)
    git = git_commit()
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
             "resumed_from": str(resumed_from) if resumed_from else None, "world_size": world_size,
             "commit": git["commit"] if git else None}
    record = {
        "format": "biobert-run-record/1",
        "output_dir": str(out.resolve()),
        "command": command,
        "run_config": cfg.to_dict(),
        "deepspeed_config": ds_config,
        "versions": versions(),
        "git": git,
        "shards": manifest_fingerprint(cfg.data.shard_dir),
        "validation": {"data": validation, "validation_dir": manifest_fingerprint(cfg.data.validation_dir)},
        "world_size": world_size,
        "launcher": launcher,
        "host": socket.gethostname(),
        "master_addr": dist.master_addr() if world_size > 1 else None,
        "run": run_info,
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
                                           "OMP_NUM_THREADS", "DS_ACCELERATOR") if k in os.environ},
        "argv": sys.argv,
        "starts": [*_previous_starts(out / RECORD), start],
    }
    atomic_write(out / RUN_CONFIG, dump_yaml(cfg.to_dict()))
    atomic_write_json(out / DEEPSPEED_CONFIG, ds_config)
    atomic_write_json(out / RECORD, record)
    return record
