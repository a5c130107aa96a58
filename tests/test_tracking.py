"""report_to backends (biobert.tracking): the rules, the one-line error for a missing package, MLflow's local file store
and W&B's offline mode read back with their own readers, resumed runs continuing the same run, fine-tuning's curves."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn
from tracking_readers import mlflow_history, mlflow_run, tensorboard_scalars, wandb_history

from biobert import tracking
from biobert.errors import UserError


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B without a network or an account: offline mode, its config and cache under tmp_path."""
    pytest.importorskip("wandb")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "wbc"),
                       ("WANDB_CACHE_DIR", tmp_path / "wbcache"), ("WANDB_DATA_DIR", tmp_path / "wbdata")):
        monkeypatch.setenv(key, str(value))
    yield
    import wandb

    wandb.teardown()  # stop W&B's background service: nothing left running after the test


def test_report_to_rules():
    assert tracking.resolve(["tensorboard"]) == ["tensorboard"]
    assert tracking.resolve(["mlflow", "wandb", "mlflow"]) == ["mlflow", "wandb"]
    assert tracking.resolve(["none"]) == [] and tracking.resolve([]) == []
    assert tracking.resolve(["tensorboard", "mlflow"], tensorboard=False) == ["mlflow"]  # the older key still works
    assert tracking.resolve(["wandb"], tensorboard=True) == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        tracking.resolve(["none", "wandb"])
    with pytest.raises(ValueError, match="'mlfow' unknown; choose from tensorboard, mlflow, wandb, none"):
        tracking.resolve(["mlfow"])


def test_missing_backend_stops_every_stage_with_the_pip_command(monkeypatch, capsys, tmp_path):
    from biobert.errors import run
    from finetuning.ner import cli as ner_cli
    from pretraining.run import cli as pretrain_cli

    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    rc = run(pretrain_cli, ["--config", "tiny_cpu", f"output_dir={tmp_path / 'p'}", "data.shard_dir=nowhere",
                            "logging.report_to=tensorboard,wandb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: logging.report_to includes wandb but it is not installed: pip install "
                               "'biobert-at-scale[wandb]' (or pip install wandb), or drop wandb from logging.report_to")
    assert not (tmp_path / "p").exists()  # stopped before anything was written
    rc = run(ner_cli, ["--data", str(tmp_path), "--output-dir", str(tmp_path / "n"), "--report-to", "wandb"])
    assert rc == 2 and "pip install 'biobert-at-scale[wandb]'" in capsys.readouterr().err


def test_mlflow_local_file_store_round_trip_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracking.Tracker(["mlflow"], tmp_path, config={"optimizer": {"lr": 1e-4}, "seed": 3}, project="proj",
                         run_name="first")
    for step in (1, 2):
        t.log({"train/loss": 1.0 / step, "train/lr": 0.1, "skipped": None, "nan": math.nan, "flag": True}, step)
    t.close({"final_loss": 0.5}, finished=False)  # a preempted run: not FINISHED
    ids = json.loads((tmp_path / "tracking.json").read_text())
    assert ids["mlflow_tracking_uri"] == (tmp_path / "mlruns").as_uri()  # a file store in the output dir
    assert mlflow_history(tmp_path, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert mlflow_history(tmp_path, "flag") == [(1, 1.0), (2, 1.0)] and mlflow_history(tmp_path, "nan") == []
    run = mlflow_run(tmp_path)
    assert run.data.params == {"optimizer.lr": "0.0001", "seed": "3"} and run.info.status == "KILLED"
    assert run.info.run_name == "first"

    again = tracking.Tracker(["mlflow"], tmp_path, config={"seed": 4}, project="proj", start_step=2, resume=True)
    again.log({"train/loss": 0.25}, 3)
    again.close({"final_loss": 0.25})
    assert json.loads((tmp_path / "tracking.json").read_text())["mlflow_run_id"] == ids["mlflow_run_id"]  # the same run
    assert mlflow_history(tmp_path, "train/loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "3"  # params are the first start's


def test_wandb_offline_run_holds_the_metrics(tmp_path, offline_wandb):
    t = tracking.Tracker(["wandb"], tmp_path, config={"a": 1}, project="proj", run_name="r")
    for step in (1, 2, 3):
        t.log({"train/loss": 1.0 / step, "val/mlm_loss": 2.0}, step)
    t.close({"final_loss": 1 / 3})
    rows = wandb_history(tmp_path)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    run_id = json.loads((tmp_path / "tracking.json").read_text())["wandb_run_id"]
    assert [p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*")] == [True]


def test_a_backend_that_fails_mid_run_is_switched_off_not_fatal(tmp_path, caplog):
    class Broken:
        def log(self, values, step):
            raise ConnectionError("server went away")

        def close(self, summary, finished):
            pass

    t = tracking.Tracker([], tmp_path)
    t.backends = {"mlflow": Broken()}
    t.log({"loss": 1.0}, 1)
    t.log({"loss": 1.0}, 2)
    assert t.backends == {} and len([r for r in caplog.records if "switched off" in r.message]) == 1
    t.close()


def test_a_backend_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    with pytest.raises(UserError, match="report_to mlflow: could not start a run"):
        tracking.Tracker(["mlflow"], tmp_path, tracking_uri="unknownscheme://nowhere")


# ---------------------------------------------------------------- fine-tuning's curves


class _Tiny(nn.Module):
    """A linear token tagger: the loss falls step by step, in milliseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        logits = self.out(self.emb(input_ids))
        return {"loss": nn.functional.cross_entropy(logits.view(-1, 2), labels.view(-1), ignore_index=-100),
                "logits": logits}


def _features(n=48):
    rng = random.Random(0)
    feats = []
    for _ in range(n):
        ids = [rng.randrange(2, 50) for _ in range(rng.randint(3, 12))]
        feats.append({"input_ids": ids, "labels": [i % 2 for i in ids]})
    return feats


def test_finetuning_logs_every_step_and_draws_its_curves(tmp_path, offline_wandb, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from finetuning.config import NERConfig
    from finetuning.trainer import Runtime, fit

    cfg = NERConfig(data="x", output_dir=str(tmp_path), batch_size=8, epochs=2, progress=False, learning_rate=0.05,
                    warmup_ratio=0.0, report_to=["tensorboard", "mlflow", "wandb"], seed=1)
    scores = iter([{"f1": 0.25, "precision": 0.5}, {"f1": 0.5, "precision": 0.75}])
    result = fit(_Tiny(), _features(), cfg, Runtime(torch.device("cpu")), evaluate=lambda m: next(scores), desc="ner")
    steps = result["steps"]
    assert steps == 12 and [c["step"] for c in result["curve"]] == list(range(1, 13))  # < 100 steps: every step
    losses = [c["train_loss"] for c in result["curve"]]
    assert losses[-1] < losses[0]
    loss = mlflow_history(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 13)) and [v for _, v in loss] == pytest.approx(losses)
    assert [v for _, v in mlflow_history(tmp_path, "train/lr")] == pytest.approx([c["lr"] for c in result["curve"]])
    assert mlflow_history(tmp_path, "dev/f1") == [(6, 0.25), (12, 0.5)]
    assert mlflow_run(tmp_path).info.run_name == f"ner:{tmp_path.name}"
    wb = [r for r in wandb_history(tmp_path) if "train/loss" in r]
    assert [r["_step"] for r in wb] == list(range(1, 13)) and [r["train/loss"] for r in wb] == pytest.approx(losses)
    assert [s for s, _ in tensorboard_scalars(tmp_path, "train/loss")] == list(range(1, 13))
    png = tmp_path / result["plot"]
    assert png.name == "training_curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left

    none = NERConfig(data="x", output_dir=str(tmp_path / "quiet"), batch_size=8, epochs=1, progress=False,
                     report_to=["none"])
    fit(_Tiny(), _features(), none, Runtime(torch.device("cpu")))
    assert sorted(p.name for p in (tmp_path / "quiet").iterdir()) == ["training_curves.png"]
