"""Issue 5, test 1: N steps straight == stop at k -> resume -> N, bit for bit (losses, lr, sample ids, fp32 weights).

One rank in-process (the 2-rank case is in test_fault_multirank.py). Stop points on the synthetic shards (4 x 16
samples, global batch 8): mid-shard (step 3), at a shard boundary (step 4), at the epoch boundary (step 8), and a
signal arriving between two micro-batches of gradient accumulation (step 5, micro 2 of 4), each with loader prefetch
depth 1 and 2. (The loader's minimum depth is 1: its background reader always runs, so "0" is not a mode it has.)
Dropout is on, so the restored per-rank RNG streams matter.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

MAX_STEPS = 10  # crosses the epoch boundary (8 steps)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict:
    from pretraining.trainer import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = ef.SampleLog()
    try:
        result = main(ef.synth_cfg(tmp_path_factory.mktemp("straight"), shards, MAX_STEPS,
                                   checkpoint={"every_steps": 0}), on_micro=ids)
    finally:
        torch.set_num_threads(n)
    return dict(losses=result["losses"], lr=[r["lr"] for r in result["records"]], ids=ids.steps,
                weights=ef.weights(result["engine"]))


CASES = {"mid_shard": (3, None), "shard_boundary": (4, None), "epoch_boundary": (8, None), "mid_accumulation": (5, 2)}


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_stop_resume_is_bit_identical(tmp_path, shards, straight, case, prefetch):
    from pretraining.trainer import main

    stop_step, stop_micro = CASES[case]
    cfg = ef.synth_cfg(tmp_path, shards, MAX_STEPS, [f"data.prefetch={prefetch}"],
                       checkpoint={"every_steps": 0})  # only the signal saves

    def signal_at_step(step, engine):
        if stop_micro is None and step == stop_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def signal_mid_accumulation(step, micro, sample_ids, engine):
        ids(step, micro, sample_ids, engine)
        if step == stop_step and micro == stop_micro:
            os.kill(os.getpid(), signal.SIGUSR1)  # between micro-batches: the step finishes, then saves

    ids = ef.SampleLog()
    first = main(cfg, on_step=signal_at_step, on_micro=signal_mid_accumulation)
    assert (first["step"], first["exit_code"], first["checkpoint"].name) == (stop_step, 75, f"step_{stop_step:08d}")
    second = main(cfg, on_micro=ids)
    assert second["resumed_from"].name == f"step_{stop_step:08d}" and second["exit_code"] == 0

    assert first["losses"] + second["losses"] == straight["losses"]  # bit-identical, step for step
    assert [r["lr"] for r in first["records"] + second["records"]] == straight["lr"]  # scheduler state restored
    assert ids.steps == straight["ids"]  # loader position: the same samples in the same steps, none lost or repeated
    assert sorted(i for s in range(1, 9) for i in ids.steps[s]) == list(range(64))  # epoch 1: each sample once
    ef.assert_same_weights(ef.weights(second["engine"]), straight["weights"])
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "metrics.jsonl").read_text()
             .splitlines() if line.startswith('{"step"')]
    assert steps == list(range(1, MAX_STEPS + 1))  # metrics.jsonl: every step once
    assert [r["samples_consumed"] for r in second["records"]] == [ef.GLOBAL_BATCH * s
                                                                  for s in range(stop_step + 1, MAX_STEPS + 1)]
