"""Issue 5, test 6: NaN loss stops the run naming step, rank, sample ids and shard; fp16 overflow steps are skipped
and counted (and the count survives a resume); loss spikes are flagged in the metrics and warned about.

DeepSpeed refuses fp16 on CPU, so the skip-and-count rule is unit-tested on pretraining.numerics.NumericsMonitor (fed
the engine's skipped-step counter, as the trainer does) together with DeepSpeed's own DynamicLossScaler on an injected
inf gradient; the counter's persistence goes through the real engine (save, load, metrics)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from pretraining.numerics import OK, SKIPPED, STOP, NumericsMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py


def test_fp16_overflow_from_inf_gradient_is_skipped_and_counted():
    """An inf gradient makes DeepSpeed's dynamic loss scaler report overflow; the engine then skips the step and bumps
    skipped_steps; the monitor counts it (no stop) even when the loss itself is inf, and stops a hopeless streak."""
    from deepspeed.runtime.utils import has_inf_or_nan

    grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])  # the injected overflow
    assert bool(has_inf_or_nan(grad)) and not bool(has_inf_or_nan(torch.ones(4)))  # DeepSpeed's fp16 overflow test

    mon = NumericsMonitor(fp16=True, skipped_steps=3, max_overflow_streak=2)  # 3 skipped before a resume
    assert mon.update(1, 5.0, 3)[0] == OK
    verdict, fields = mon.update(2, float("inf"), 4)  # overflow: engine skipped it
    assert verdict == SKIPPED and fields == {"skipped_steps": 4, "overflow": True, "loss_spike": False}
    assert mon.update(3, 5.0, 5)[0] == SKIPPED  # finite loss, gradient overflow: skipped too
    assert mon.update(4, 5.0, 6)[0] == STOP and "3 overflow-skipped steps in a row" in mon.reason


def test_nonfinite_loss_not_skipped_stops():
    for fp16 in (False, True):
        mon = NumericsMonitor(fp16=fp16)
        assert mon.update(1, 5.0, 0)[0] == OK
        assert mon.update(2, float("nan"), 0)[0] == STOP and "non-finite loss nan at step 2" in mon.reason


def test_loss_spike_flagged_against_running_median(caplog):
    mon = NumericsMonitor(fp16=False, spike_factor=2.0, spike_window=5, spike_min_history=3)
    flags = []
    with caplog.at_level(logging.WARNING, logger="pretraining.numerics"):
        for step, loss in enumerate([4.0, 3.9, 3.8, 7.0, 3.7, 8.0, 3.6], 1):
            verdict, fields = mon.update(step, loss, 0)
            assert verdict == OK  # spikes are logged, never a stop
            flags.append(fields["loss_spike"])
    assert flags == [False, False, False, False, False, True, False]  # 7.0 < 2 x 3.9; 8.0 > 2 x 3.85
    assert "loss spike at step 6" in caplog.text


def test_nan_loss_stops_run_naming_step_rank_samples_and_shard(tmp_path, shards):
    from pretraining import checkpoint as ckpt
    from pretraining.trainer import main

    seen = ef.SampleLog()

    def poison(step, micro, sample_ids, engine):
        seen(step, micro, sample_ids, engine)
        if step == 3 and micro == 2:  # one micro-batch of step 3 goes non-finite
            engine.module.cls.predictions.bias.data.fill_(float("nan"))

    cfg = ef.synth_cfg(tmp_path, shards, 6, checkpoint={"every_steps": 1})
    with pytest.raises(FloatingPointError) as e:
        main(cfg, on_micro=poison)
    msg = str(e.value)
    bad_ids = seen.steps[3][4:8]  # micro-batches 2 and 3 of 4 (2 samples each): the bias stays NaN
    assert "non-finite loss nan at step 3" in msg and "rank 0: non-finite loss in micro-batch(es) [2, 3]" in msg
    assert f"sample ids {bad_ids}" in msg
    shard = f"shard-{bad_ids[0] // 16:05d}-of-00004.hdf5 rows [{bad_ids[0] % 16}"
    assert shard in msg, msg
    assert ckpt.latest_complete(tmp_path / "checkpoints").name == "step_00000002"  # the NaN step never saved


def test_loss_spike_in_engine_metrics(tmp_path, shards, caplog):
    from pretraining.trainer import main

    def spike(step, engine):
        if step == 5:  # a large MLM bias: the loss jumps for one step
            engine.module.cls.predictions.bias.data.normal_(0, 30, generator=torch.Generator().manual_seed(0))

    cfg = ef.synth_cfg(tmp_path, shards, 5, ["numerics.spike_min_history=3"], checkpoint={"every_steps": 0})
    with caplog.at_level(logging.WARNING, logger="pretraining.numerics"):
        result = main(cfg, on_step=spike)
    assert [r["loss_spike"] for r in result["records"]] == [False] * 4 + [True]
    assert "loss spike at step 5" in caplog.text
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step"' in x][-1]
    assert last["loss_spike"] is True and result["exit_code"] == 0


def test_skipped_step_count_survives_resume(tmp_path, shards):
    """The engine's overflow counter (bumped here as DeepSpeed's fp16 path does on an overflow) is saved in the
    checkpoint and restored: the resumed run reports it, and new overflows add to it."""
    from pretraining.trainer import main

    def overflow_then_stop(step, engine):
        if step in (2, 5):
            engine.skipped_steps += 1
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    cfg = ef.synth_cfg(tmp_path, shards, 6, checkpoint={"every_steps": 0})
    first = main(cfg, on_step=overflow_then_stop)
    assert first["step"] == 3 and [r["skipped_steps"] for r in first["records"]] == [0, 1, 1]
    assert [r["overflow"] for r in first["records"]] == [False, True, False]
    client = torch.load(first["checkpoint"] / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["overflow_steps_skipped"] == 1 and client["skipped_steps"] == 1
    second = main(cfg, on_step=overflow_then_stop)
    assert second["engine"].skipped_steps == 2 and second["summary"]["skipped_steps"] == 2
    assert [r["skipped_steps"] for r in second["records"]] == [1, 2, 2]
    assert [r["overflow"] for r in second["records"]] == [False, True, False]
