"""Checkpoint completeness, retention, RNG capture, and (in-process, one rank) SIGUSR1 -> save -> exit 75 -> resume."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretraining import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / ckpt.tag_for(step)
    (folder / "hf").mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    (folder / "hf" / "config.json").write_text("{}")
    if complete:
        ckpt.mark_complete(folder, step=step, world_size=1, zero_stage=2, samples_consumed=step * 8)
    return folder


def test_newest_complete_wins_and_incomplete_ones_are_reported(tmp_path, caplog):
    for step in (10, 20):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 30, complete=False)  # killed before the marker
    truncated = fake_checkpoint(tmp_path, 40)
    with open(truncated / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(10)  # marker present, a rank's file cut short afterwards
    complete, problems = ckpt.scan(tmp_path)
    assert [p.name for p in complete] == ["step_00000010", "step_00000020"]
    assert any("step_00000030" in p and "COMPLETE.json" in p for p in problems)
    assert any("zero_pp_rank_0" in p and "truncated" in p for p in problems)
    with caplog.at_level("WARNING"):
        assert ckpt.latest_complete(tmp_path).name == "step_00000020"
    assert "ignoring incomplete checkpoint" in caplog.text
    assert ckpt.resolve(tmp_path).name == "step_00000020"
    with pytest.raises(ValueError, match="incomplete checkpoint.*step_00000030.*no COMPLETE.json"):
        ckpt.resolve(tmp_path / "step_00000030")
    with pytest.raises(ValueError, match="incomplete checkpoint.*truncated"):
        ckpt.resolve(truncated)
    marker = json.loads((tmp_path / "step_00000020" / ckpt.MARKER).read_text())
    assert marker["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 300 and marker["step"] == 20


def test_retention_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 0, complete=False)  # stale crash leftover, older than the newest complete
    fake_checkpoint(tmp_path, 5, complete=False)  # newer than the newest complete: a save that crashed
    ckpt.prune(tmp_path, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000003", "step_00000004", "step_00000005"]
    ckpt.prune(tmp_path, keep_last=1)  # the crashed step 5 never displaces the last complete one
    assert ckpt.latest_complete(tmp_path).name == "step_00000004"
    assert ckpt.discard_incomplete(tmp_path) and not (tmp_path / "step_00000005").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a checkpoint and holds no complete one"):
        ckpt.resolve(tmp_path)


def test_rng_capture_restore():
    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------- in-process engine (one rank)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, minilm_dir) -> Path:
    return ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # module scope: set before the module's `straight` runs, so both sides use one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sigusr1_saves_exits_75_and_resume_matches(tmp_path, shards, minilm_dir):
    """Signal mid-run -> checkpoint + exit code 75; a save without marker is ignored; resumed losses are identical."""
    from pretraining.trainer import EXIT_PREEMPTED, main

    def cfg(out, every):
        run = ef.tiny_run(out, shards, minilm_dir, max_steps=5, checkpoint={"every_steps": every})
        return ef.load_tiny(run, ["ds.train_batch_size=4"])  # accumulation 2 on one rank: quick

    reference = main(cfg(tmp_path / "ref", 0))["losses"]

    def send_signal(step, engine):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGUSR1)
    first = main(cfg(out, 2), on_step=send_signal)
    assert first["preempted"] and first["exit_code"] == EXIT_PREEMPTED == 75 and first["step"] == 3
    assert first["checkpoint"].name == "step_00000003" and ckpt.check_complete(first["checkpoint"])[0]
    # the marker lists what the ranks reported writing: exactly the folder's files, each with its size
    marker = ckpt.read_marker(first["checkpoint"])
    assert marker["files"] == ckpt._files(first["checkpoint"]) and "hf/config.json" in marker["files"]
    assert [(r["rank"], sorted(r["files"])) for r in marker["ranks"]] == [(0, sorted(marker["files"]))]
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # main() restores the caller's handlers
    assert first["losses"] == reference[:3]
    (first["checkpoint"] / ckpt.MARKER).unlink()  # as if killed just before the marker: must not be used
    second = main(cfg(out, 2))
    assert second["resumed_from"].name == "step_00000002" and not second["preempted"] and second["exit_code"] == 0
    assert second["losses"] == reference[2:]  # steps 3..5 redone, bit-identical
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]
    client = torch.load(out / "checkpoints" / "step_00000005" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == 5 and client["samples_consumed"] == 20 and len(client["rng"]) == 1
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["final_step"] == 5 and summary["tokens_per_s"] > 0 and summary["peak_source"]

    # A checkpoint from another world size / ZeRO stage is refused with the conversion hint, never half-loaded.
    marker = out / "checkpoints" / "step_00000005" / ckpt.MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ValueError, match="saved by 2 ranks with ZeRO stage 2.*biobert export.*data.start_sample=20"):
        main(ef.load_tiny(ef.tiny_run(out, shards, minilm_dir, max_steps=6), ["ds.train_batch_size=4"]))


def test_nan_loss_stops_with_step_and_rank(tmp_path, shards, minilm_dir):
    from pretraining.trainer import main

    def poison(step, engine):
        if step == 2:
            engine.module.bert.embeddings.LayerNorm.weight.data.fill_(float("nan"))

    run = ef.tiny_run(tmp_path / "out", shards, minilm_dir, max_steps=4, checkpoint={"every_steps": 1})
    with pytest.raises(FloatingPointError, match=r"(?s)non-finite loss nan at step 2.*rank 0: non-finite loss in "
                                                 r"micro-batch\(es\) \[0\], sample ids \[.*shard-0000\d-of-00004"):
        main(ef.load_tiny(run, ["ds.train_batch_size=2"]), on_step=poison)
    # the poisoned step was never checkpointed: the newest complete checkpoint is step 1
    assert ckpt.latest_complete(tmp_path / "out" / "checkpoints").name == "step_00000001"
