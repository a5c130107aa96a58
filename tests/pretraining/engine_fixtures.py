"""Helpers shared by the engine tests: real-corpus shards, tiny run configs, launcher subprocesses, metrics reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from biobert.files import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_DS = REPO / "ds_configs" / "tiny_cpu.json"
# tiny_cpu.json uses AdamW 3e-3: a tiny model's loss visibly falls within a dozen steps (LAMB's trust ratio moves
# tiny weights slowly). No overrides by default; tests add their own.
TINY_OVERRIDES: list[str] = []


def corpus_shards(base: Path, shared_data: Path, minilm_dir: Path) -> Path:
    """Shards made by data_prep from one real PubMed file (seq 128, 4 shards, dynamic masking); built once per session."""
    out = base / "corpus_shards_seq128"
    if not (out / "manifest.json").is_file():
        from data_prep.run import PrepConfig
        from data_prep.run import main as prep

        prep(PrepConfig(inputs=[str(shared_data / "corpus" / "pubmed" / "pubmed-sample-0001.xml.gz")],
                        output_dir=str(out), vocab=str(minilm_dir), seq_len=128, num_shards=4, progress=False,
                        dynamic_masking=True))
    return out


def tiny_run(out_dir: Path, shard_dir: Path, tokenizer: Path, max_steps: int = 12, **sections) -> dict:
    run = {
        "output_dir": str(out_dir), "max_steps": max_steps, "seed": 7,
        "model": {"init": None, "preset": "tiny", "tokenizer": str(tokenizer) if tokenizer else None},
        "data": {"shard_dir": str(shard_dir)},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"progress_bar": False, "tensorboard": True},
    }
    for key, value in sections.items():
        run[key] = {**run.get(key, {}), **value} if isinstance(value, dict) else value
    return run


def load_tiny(run: dict, overrides=()):
    from pretraining.config import load_config

    return load_config(run, TINY_DS, [*TINY_OVERRIDES, *overrides])


def step_losses(output_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; the last record of a step wins (a resumed run redoes steps after a kill)."""
    out = {}
    path = Path(output_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written while a test polls
            continue
        if "step" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def clean_env() -> dict:
    """Environment for a launcher subprocess: CPU accelerator, none of this process's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores: no thread oversubscription
    env["PYTHONUNBUFFERED"] = "1"
    return env


def deepspeed_cmd(script: Path, *args: str, num_gpus: int = 2) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(num_gpus), "--master_port", str(free_port()), str(script), *args]


def run_launcher(cmd: list[str], log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group, output to `log`; on timeout the whole group (launcher + ranks) is
    killed."""
    from subproc import run_group  # tests/ is on sys.path under pytest; the rank scripts that import us never call this

    with open(log, "w") as f:
        return run_group(cmd, timeout=timeout, cwd=REPO, env=clean_env(), stdout=f, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- fault-tolerance tests (tests/pretraining/test_fault_*)

SYNTH = dict(num_shards=4, samples_per_shard=16, seq_len=32, max_predictions=5, vocab_size=100)  # 64 samples
GLOBAL_BATCH = 8  # tiny_cpu.json: 2 steps per shard, 8 steps per epoch


def synthetic_shards(base: Path) -> Path:
    """4 static-masking shards x 16 samples, vocab 100 (vocab.txt in the same dir doubles as the tokenizer)."""
    from benchmarks.synthetic import write_synthetic_shards

    out = Path(base) / "synthetic_shards"
    if not (out / "manifest.json").is_file():
        write_synthetic_shards(out, **SYNTH)
    return out


def synth_cfg(out_dir: Path, shard_dir: Path, max_steps: int, overrides=(), **sections):
    """A tiny BERT on the synthetic shards, ZeRO-2 fp32 (tiny_cpu.json), dropout on (so RNG restore matters)."""
    run = tiny_run(out_dir, shard_dir, shard_dir, max_steps=max_steps, **sections)
    run["logging"] = {"progress_bar": False, "tensorboard": False}
    return load_tiny(run, list(overrides))


class SampleLog:
    """on_micro hook recording the global sample ids each step consumed (the last run of a step wins)."""

    def __init__(self):
        self.steps: dict[int, list[int]] = {}

    def __call__(self, step, micro, sample_ids, engine) -> None:
        if micro == 0:
            self.steps[step] = []
        self.steps[step] += sample_ids.tolist()


def weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch_equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def torch_equal(x, y) -> bool:
    import torch

    return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
