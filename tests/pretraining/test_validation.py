"""Validation during pretraining (pretraining.evaluation): the figures, resume safety, training left untouched, the
run record, data without a split. One rank in-process on synthetic shards; the 2-rank ZeRO-3 case is marked slow."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

MAX_STEPS = 8
EVAL = ["eval.every_steps=3", "eval.max_samples=18"]  # evaluations after steps 3, 6 and 8 (the end)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py: bit-exact comparisons


def held_out(out: Path, *, seed: int = 11, samples: int = 12, manifest: bool = True, masking: str = "static") -> Path:
    from benchmarks.synthetic import write_synthetic_shards

    write_synthetic_shards(out, num_shards=2, samples_per_shard=samples, seq_len=ef.SYNTH["seq_len"],
                           max_predictions=ef.SYNTH["max_predictions"], vocab_size=ef.SYNTH["vocab_size"], seed=seed,
                           masking=masking, manifest=manifest)
    return out


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory) -> Path:
    """The fault tests' synthetic training shards (same data, same seed) with a held-out split in the manifest, as
    data_prep writes it (format 2: validation/ shards with checksums)."""
    from data_prep import contract

    out = ef.synthetic_shards(tmp_path_factory.mktemp("split"))
    staged = held_out(out.parent / "staged")
    (out / contract.VALIDATION_DIR).mkdir()
    manifest, val = contract.Manifest.load(out), contract.Manifest.load(staged)
    for info in val.shards:
        shutil.move(staged / info.file, out / contract.VALIDATION_DIR / info.file)
        info.file = f"{contract.VALIDATION_DIR}/{info.file}"
    manifest.validation = contract.ValidationSplit(
        fraction=0.25, documents=6, sentences=48, tokens=sum(s.tokens for s in val.shards),
        instances=val.total_samples, shards=val.shards)
    manifest.format_version = 2
    manifest.save(out)
    return out


def run(out: Path, shards: Path, overrides=(), **hooks) -> dict:
    from pretraining.trainer import main

    cfg = ef.synth_cfg(out, shards, MAX_STEPS, [*EVAL, *overrides], checkpoint={"every_steps": 0})
    return main(cfg, **hooks)


def validation(records) -> dict[int, dict]:
    """step -> figures (wall time left out: it is the only thing allowed to differ)."""
    return {r["step"]: {k: v for k, v in r["validation"].items() if k != "seconds"} for r in records
            if r.get("validation")}


def jsonl_validation(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "step" in r]
    assert steps == sorted(set(steps)), "a step logged twice"
    return validation([r for r in lines if "step" in r])


@pytest.fixture(scope="module")
def straight(split_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    result = run(out, split_shards)
    return dict(out=out, losses=result["losses"], validation=validation(result["records"]), summary=result["summary"])


def test_evaluates_at_the_due_steps_and_leaves_training_untouched(straight, shards, tmp_path, caplog):
    val = straight["validation"]
    assert sorted(val) == [3, 6, 8]
    for v in val.values():
        assert v["samples"] == 18 and v["masked_tokens"] > 18 and v["tokens"] > v["masked_tokens"]
        assert v["perplexity"] == pytest.approx(math.exp(v["mlm_loss"]))
        assert v["loss"] == pytest.approx(v["mlm_loss"] + v["nsp_loss"])
        assert 0 <= v["mlm_acc"] <= 1 and 0 <= v["nsp_acc"] <= 1
        assert abs(v["mlm_loss"] - math.log(ef.SYNTH["vocab_size"])) < 1.0  # a tiny model near chance on random ids
    assert val[3] != val[6]  # the weights moved between evaluations
    assert jsonl_validation(straight["out"]) == val  # metrics.jsonl: on the step's own record
    s = straight["summary"]
    assert s["val_step"] == 8 and s["val_mlm_loss"] == val[8]["mlm_loss"] and "18 of 24 samples" in s["validation"]

    # the same training data without any validation data: it says so once, trains, and every loss is bit-identical
    # (evaluation draws no random numbers and puts the model back in train mode)
    with caplog.at_level(logging.WARNING, logger="pretraining.evaluation"):
        plain = run(tmp_path, shards)
    assert len([r for r in caplog.records if "no validation data" in r.message]) == 1
    assert not validation(plain["records"]) and "val_step" not in plain["summary"]
    assert plain["losses"] == straight["losses"]


@pytest.mark.parametrize("stop_step", [4, 6])  # between evaluations; on an evaluation step
def test_validation_records_survive_stop_and_resume(straight, split_shards, tmp_path, stop_step):
    def signal_at(step, engine):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    first = run(tmp_path, split_shards, on_step=signal_at)
    assert (first["step"], first["exit_code"]) == (stop_step, 75)
    second = run(tmp_path, split_shards)
    assert second["resumed_from"].name == f"step_{stop_step:08d}"
    assert validation(first["records"] + second["records"]) == straight["validation"]  # bit-identical figures
    assert jsonl_validation(tmp_path) == straight["validation"]  # each evaluation once in metrics.jsonl
    record = json.loads((tmp_path / "run_record.json").read_text())
    assert [s["step"] for s in record["starts"]] == [0, stop_step]
    assert record["starts"][1]["resumed_from"].endswith(f"step_{stop_step:08d}")


def test_figures_equal_an_independent_computation(shards, tmp_path):
    """NVIDIA-style held-out dir (plain hdf5 files, unmasked: masked at evaluation by the loader's pure function): the
    trainer's figures at the end equal cross-entropy and accuracies computed here from the final weights, with
    another batching (one sample at a time) and without the packed path."""
    import torch.nn.functional as F

    from pretraining.validation_data import validation_batches, validation_split

    vdir = held_out(tmp_path / "test", seed=5, samples=9, manifest=False, masking="dynamic")
    result = run(tmp_path / "out", shards, [f"data.validation_dir={vdir}", "eval.every_steps=0"])
    got = validation(result["records"])
    assert list(got) == [MAX_STEPS]
    got = got[MAX_STEPS]
    model = result["engine"].module.eval()
    with pytest.warns(UserWarning, match="synthesised"):
        base, manifest = validation_split(shards, vdir)
    assert manifest.masking == "dynamic"
    from benchmarks.synthetic import MASK_ID, SPECIAL_IDS

    mlm_sum = mlm_right = masked = nsp_sum = nsp_right = samples = 0.0
    with torch.no_grad():
        for b in validation_batches(base, manifest, micro_batch_size=1, rank=0, world_size=1, max_samples=18,
                                    seed=7, max_predictions=ef.SYNTH["max_predictions"],
                                    vocab_size=ef.SYNTH["vocab_size"], mask_token_id=MASK_ID,
                                    special_token_ids=SPECIAL_IDS):
            out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                        attention_mask=b["attention_mask"], return_logits=True)
            used = b["masked_lm_positions"][0] != 0
            logits = out["prediction_logits"][0, b["masked_lm_positions"][0][used]].double()
            labels = b["masked_lm_ids"][0][used]
            mlm_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            mlm_right += (logits.argmax(-1) == labels).sum().item()
            masked += int(used.sum())
            nsp = out["seq_relationship_logits"].double()
            nsp_sum += F.cross_entropy(nsp, b["next_sentence_labels"], reduction="sum").item()
            nsp_right += (nsp.argmax(-1) == b["next_sentence_labels"]).sum().item()
            samples += 1
    assert (got["samples"], got["masked_tokens"]) == (samples, masked) == (18, masked) and masked > 18
    assert got["mlm_loss"] == pytest.approx(mlm_sum / masked, rel=1e-5)
    assert got["nsp_loss"] == pytest.approx(nsp_sum / samples, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(mlm_sum / masked), rel=1e-5)
    assert got["mlm_acc"] == mlm_right / masked and got["nsp_acc"] == nsp_right / samples

    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["validation"]["validation_dir"]["synthesised"] is True
    assert record["shards"]["manifest_sha256"] and "18 of 18 samples" in record["validation"]["data"]


def test_the_run_records_itself(straight):
    """run_record.json, run_config.yaml and deepspeed_config.json, written at start; the YAML reloads to the same
    config; the checkpoint's client state carries what the model card reads."""
    from pretraining import run_record
    from pretraining.config import load_config

    out = straight["out"]
    record = json.loads((out / run_record.RECORD).read_text())
    for key in ("torch", "deepspeed", "transformers", "python"):
        assert record["versions"][key]
    assert record["world_size"] == 1 and record["launcher"] == "python"
    assert record["deepspeed_config"] == json.loads((out / run_record.DEEPSPEED_CONFIG).read_text())
    assert record["deepspeed_config"]["train_batch_size"] == ef.GLOBAL_BATCH
    assert record["deepspeed_config"]["zero_optimization"]["stage"] == 2
    import hashlib

    shard_dir = Path(record["run_config"]["data"]["shard_dir"])
    assert record["shards"]["manifest_sha256"] == hashlib.sha256((shard_dir / "manifest.json").read_bytes()).hexdigest()
    git = record["git"]
    if (run_record.REPO / ".git").exists():  # a checkout: the commit the code runs from
        assert len(git["commit"]) == 40 and isinstance(git["dirty"], bool)
    else:
        assert git is None
    again = load_config(out / run_record.RUN_CONFIG)
    assert again.to_dict() == record["run_config"]


def test_git_commit_never_fails(tmp_path):
    from pretraining.run_record import git_commit, manifest_fingerprint

    assert git_commit(tmp_path) is None  # not a checkout (an installed wheel)
    (tmp_path / ".git").write_text("gitdir: /nonexistent\n")  # a broken worktree link
    assert git_commit(tmp_path) is None
    assert manifest_fingerprint(tmp_path / "missing")["manifest_sha256"] is None


@pytest.mark.slow
def test_two_ranks_zero3_evaluate_what_one_process_computes(split_shards, tmp_path):
    """2 ranks under ZeRO-3 (every rank must run the same modules the same number of times; the subset splits into
    batches of 2 and 1) give the figures one process computes from the same weights."""
    from pretraining.evaluation import Validator
    from pretraining.export import fp32_state_dict
    from pretraining.model import BertForPreTraining, load_state_dict_into

    out = tmp_path / "z3"
    cfg = ef.tiny_run(out, split_shards, split_shards, max_steps=2, checkpoint={"every_steps": 2, "keep_last": 1},
                      logging={"progress_bar": False, "report_to": ["none"]},
                      eval={"every_steps": 2, "max_samples": 18})
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    script = ef.REPO / "pretraining" / "run.py"
    proc = ef.run_launcher(ef.deepspeed_cmd(script, "--config", str(cfg_path), "--deepspeed-config", str(ef.TINY_DS),
                                            "engine.zero_stage=3"), tmp_path / "log.txt", timeout=300)
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    two = next(r["validation"] for r in lines if r.get("step") == 2 and r.get("validation"))
    record = json.loads((out / "run_record.json").read_text())
    assert record["world_size"] == 2 and record["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert record["command"][:2] == ["biobert", "pretrain"] and "--local_rank" not in " ".join(record["command"])

    from pretraining.config import load_config
    from pretraining.optim import plan_precision

    one_cfg = load_config(cfg, ef.TINY_DS)
    folder = out / "checkpoints" / "step_00000002"
    from transformers import BertConfig

    model = BertForPreTraining(BertConfig.from_json_file(str(folder / "hf" / "config.json")))
    loaded = load_state_dict_into(model, fp32_state_dict(folder), str(folder))
    assert not loaded["missing"] and not loaded["unexpected"]
    validator = Validator.from_config(one_cfg, model.config, split_shards, plan_precision(one_cfg.deepspeed_dict(1)),
                                      torch.device("cpu"))
    one = validator(model)
    for key in ("samples", "masked_tokens", "tokens"):
        assert one[key] == two[key]
    for key in ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "perplexity"):
        assert one[key] == pytest.approx(two[key], rel=1e-5), key


def test_report_to_backends_follow_training_and_validation_across_a_resume(split_shards, tmp_path, monkeypatch):
    """TensorBoard, MLflow (local file store) and W&B (offline) get train/* every logging.every_steps and val/* at
    every evaluation; the resumed run continues the same MLflow and W&B run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tracking_readers import mlflow_history, mlflow_run, tensorboard_scalars, wandb_history

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "wbc"),
                       ("WANDB_CACHE_DIR", tmp_path / "wbcache"), ("WANDB_DATA_DIR", tmp_path / "wbdata")):
        monkeypatch.setenv(key, str(value))
    out = tmp_path / "run"
    backends = ["logging.report_to=tensorboard,mlflow,wandb", "logging.tensorboard=null", "logging.every_steps=2"]

    def signal_at(step, engine):
        if step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)

    try:
        first = run(out, split_shards, backends, on_step=signal_at)
        assert first["exit_code"] == 75 and mlflow_run(out).info.status == "KILLED"
        ids = json.loads((out / "tracking.json").read_text())
        second = run(out, split_shards, backends)
    finally:
        import wandb

        wandb.teardown()
    val = validation(first["records"] + second["records"])
    assert sorted(val) == [3, 6, 8]
    assert json.loads((out / "tracking.json").read_text()) == ids  # the same MLflow and W&B runs continued
    assert mlflow_run(out).info.status == "FINISHED"
    assert mlflow_history(out, "val/mlm_loss") == [(s, val[s]["mlm_loss"]) for s in (3, 6, 8)]
    assert [s for s, _ in mlflow_history(out, "train/loss")] == [2, 4, 6, 8]
    assert [s for s, _ in tensorboard_scalars(out, "val/perplexity")] == [3, 6, 8]
    rows = wandb_history(out)
    assert [(r["_step"], r["val/nsp_acc"]) for r in rows if "val/nsp_acc" in r] == [
        (s, val[s]["nsp_acc"]) for s in (3, 6, 8)]
    assert {p.name.split("-")[-1] for p in (out / "wandb").glob("offline-run-*")} == {ids["wandb_run_id"]}
