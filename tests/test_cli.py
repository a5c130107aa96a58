"""The front door: `biobert` lists every stage, every flag says what it does, and a user's mistake is one line
`error: ...` with exit 2 (rank 0 only), a traceback only with --debug."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from biobert.cli import COMMANDS


def biobert(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biobert", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line and "[INFO]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_stage(tmp_path):
    r = biobert("--help", cwd=tmp_path)
    assert r.returncode == 0
    for name in ("prep", "validate", "vocab", "pretrain", "export", "convert", "ner", "re", "qa", "evaluate", "sweep",
                 "bench", "plan", "demo"):
        assert f"\n  {name} " in r.stdout
    r = biobert("pretrian", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'pretrain'?" in r.stderr


def config_classes():
    from benchmarks.engine_bench import EngineBenchConfig
    from benchmarks.loader_bench import LoaderBenchConfig
    from benchmarks.train_bench import TrainBenchConfig
    from data_prep.demo import PrepDemoConfig
    from data_prep.run import PrepConfig
    from data_prep.validate import ValidateConfig
    from data_prep.vocab import VocabConfig
    from finetuning.benchmark import FinetuneBenchConfig
    from finetuning.bioasq import BioasqConfig
    from finetuning.config import NERConfig, QAConfig, REConfig
    from finetuning.evaluate_all import SuiteConfig
    from finetuning.sweep import SweepConfig
    from launch.env import PlanConfig
    from launch.pipeline import DemoConfig
    from launch.shard_parts import MergeConfig, SliceConfig
    from launch.sweep_parts import CollectConfig, IndexConfig
    from pretraining.config import RunConfig
    from pretraining.convert import ConvertConfig
    from pretraining.export import ExportConfig

    return [PrepConfig, ValidateConfig, VocabConfig, RunConfig, ExportConfig, ConvertConfig, NERConfig, REConfig,
            QAConfig, SuiteConfig, SweepConfig, BioasqConfig, PlanConfig, DemoConfig, LoaderBenchConfig,
            FinetuneBenchConfig, EngineBenchConfig, TrainBenchConfig, PrepDemoConfig, SliceConfig, MergeConfig,
            IndexConfig, CollectConfig]


def test_every_setting_has_a_description():
    from biobert.config import hints, is_section

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = hints(cls)[f.name]
            if is_section(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif f.metadata.get("flag", True):
                yield prefix + f.name, f.metadata.get("help", "")

    undescribed = [f"{cls.__name__}.{name}" for cls in config_classes() for name, text in walk(cls) if not text]
    assert undescribed == []


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"bench"}))
def test_every_command_has_help(name, tmp_path):
    r = biobert(name, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage: biobert" in r.stdout and "--help" in r.stdout, r.stderr[-2000:]


def test_hf_spellings_are_accepted(tmp_path):
    r = biobert("ner", "--data", "d", "--learning_rate", "3e-5", "--num_train_epochs", "2",
                "--per_device_train_batch_size", "8", "--output_dir", "o", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "learning_rate: 3.0e-05" in r.stdout and "epochs: 2.0" in r.stdout and "batch_size: 8" in r.stdout


def test_fine_tuning_mistakes_are_one_line(tmp_path, minilm_dir):
    assert_one_line_error(biobert("ner", cwd=tmp_path), "--data is required")
    assert_one_line_error(biobert("ner", "--data", "/nope", cwd=tmp_path), "--data '/nope' is not a directory")
    assert_one_line_error(biobert("ner", "--data", "d", "--learnig-rate", "1", cwd=tmp_path),
                          "unknown option --learnig-rate; did you mean --learning-rate?")
    assert_one_line_error(biobert("re", "--data", "d", "--cv-folds", "1", cwd=tmp_path), "cv_folds must be 0")
    data = tmp_path / "ner"
    data.mkdir()
    (data / "test.tsv").write_text("Aspirin\tO\ncauses\tO\nulcers\tB-Disease\n\n")
    # a model directory without its tokenizer: transformers would hand out a 5-token one and score 0 silently
    bare = tmp_path / "bare"
    shutil.copytree(minilm_dir, bare)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert_one_line_error(biobert("ner", "--model", bare, "--data", data, cwd=tmp_path), "has no tokenizer")
    wrong = tmp_path / "wrong"
    shutil.copytree(minilm_dir, wrong)
    (wrong / "tokenizer.json").unlink(missing_ok=True)
    (wrong / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdef")) + "\n")
    assert_one_line_error(biobert("ner", "--model", wrong, "--data", data, cwd=tmp_path),
                          "its tokenizer has 11 tokens but the model's vocab_size is 30522")
    # evaluating a model that was never fine-tuned for NER (its labels would read LABEL_0, LABEL_1)
    assert_one_line_error(biobert("ner", "--model", minilm_dir, "--data", data, "--no-do-train", cwd=tmp_path),
                          "has no fine-tuned NER head", "--do-train")


def test_pretraining_and_export_mistakes_are_one_line(tmp_path):
    assert_one_line_error(biobert("pretrain", "--config", "tiny_cpu", "optimizer.lrr=1", "data.shard_dir=s",
                                  cwd=tmp_path), "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?")
    assert_one_line_error(biobert("pretrain", "--config", "tiny_cpus", cwd=tmp_path), "did you mean 'tiny_cpu'?")
    assert_one_line_error(biobert("pretrain", "--config", "biobert_continued_seq512", "data.shard_dir=s",
                                  cwd=tmp_path), "model.init is required")
    r = biobert("plan", "--config", "tiny_cpu", "--nproc-per-node", "3", "batch.global_batch_size=7", cwd=tmp_path)
    assert_one_line_error(r, "global batch 7 is not divisible by the world size 3")
    # under a launcher only rank 0 speaks; every rank exits 2
    r = biobert("pretrain", "--config", "tiny_cpu", "optimizer.lrr=1", cwd=tmp_path,
                env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert r.returncode == 2 and "error" not in r.stderr
    assert_one_line_error(biobert("export", tmp_path, tmp_path / "out", cwd=tmp_path), "not a checkpoint")
    incomplete = tmp_path / "checkpoints" / "step_00000004"
    incomplete.mkdir(parents=True)
    assert_one_line_error(biobert("export", incomplete, tmp_path / "out", cwd=tmp_path), "incomplete checkpoint")
    assert not (tmp_path / "out").exists()
    r = biobert("export", tmp_path, tmp_path / "out", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug: the traceback, for bug reports


def test_vocab_mismatch_is_named_before_step_1(tmp_path):
    """Shards made with one vocab, a model with another: stop before any training, naming both."""
    from data_prep.demo import DEMO_CORPUS as demo_corpus

    vocab = tmp_path / "vocab"
    assert biobert("vocab", demo_corpus, "--output-dir", vocab, "--vocab-size", "600", "--min-frequency", "1",
                   cwd=tmp_path).returncode == 0
    r = biobert("prep", demo_corpus, "--output-dir", tmp_path / "shards", "--vocab", vocab, "--num-shards", "1",
                "--workers", "1", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = biobert("pretrain", "--config", "tiny_cpu", f"data.shard_dir={tmp_path / 'shards'}", "output_dir=run",
                cwd=tmp_path, env={"DS_ACCELERATOR": "cpu"})
    assert_one_line_error(r, "vocab")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_print_config_shows_the_generated_deepspeed_dict(tmp_path):
    r = biobert("pretrain", "--config", "biobert_continued_seq512", "model.init=bert-base-cased",
                "data.shard_dir=s", "--print-config", cwd=tmp_path, env={"WORLD_SIZE": "8", "RANK": "0"})
    assert r.returncode == 0, r.stderr
    assert "deepspeed (generated for world size 8)" in r.stdout and "train_batch_size: 192" in r.stdout
    r = biobert("ner", "--data", "d", "--print-config", "--config", tmp_path / "c.json", cwd=tmp_path)
    assert_one_line_error(r, "c.json: config file not found")
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 2e-5, "epochs": 7}))
    r = biobert("ner", "--data", "d", "--print-config", "--config", tmp_path / "c.json", "--epochs", "4", cwd=tmp_path)
    assert "learning_rate: 2.0e-05" in r.stdout and "epochs: 4.0" in r.stdout  # file < flags
