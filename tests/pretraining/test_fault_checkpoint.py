"""Issue 5, tests 2 and 7 (one rank): a crash at every phase of a save never yields a loaded partial checkpoint,
retention never deletes the last complete one, a resume reproduces the straight run; world-size / ZeRO-stage changes
are refused with the conversion recipe, and that recipe continues the data exactly; metrics.jsonl has each step once.

Crashes are injected at ``checkpoint.SAVE_PHASES`` through ``checkpoint.FAULT_HOOK``: in-process as an exception (the
files on disk are then exactly what a kill leaves: the save has no cleanup path), and once for real, a subprocess that
SIGKILLs itself halfway through writing DeepSpeed's optimizer-state file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretraining import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

MAX_STEPS = 6


class Crash(BaseException):
    """Not an Exception: nothing in the engine may catch it, as nothing catches SIGKILL."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/pretraining/conftest.py


def _cfg(out, shards, max_steps=MAX_STEPS, overrides=()):
    return ef.synth_cfg(out, shards, max_steps, overrides, checkpoint={"every_steps": 2, "keep_last": 1})


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict:
    from pretraining.trainer import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = ef.SampleLog()
    try:
        result = main(_cfg(tmp_path_factory.mktemp("straight"), shards), on_micro=ids)
    finally:
        torch.set_num_threads(n)
    return dict(losses=result["losses"], weights=ef.weights(result["engine"]), ids=ids.steps,
                lr=[r["lr"] for r in result["records"]])


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.startswith('{"step"')]


@pytest.mark.parametrize("phase", ckpt.SAVE_PHASES)
def test_crash_at_each_save_phase_resumes_from_last_complete(tmp_path, shards, straight, monkeypatch, phase):
    from pretraining.trainer import main

    saves = []

    def crash_in_second_save(p):
        if p == "start":
            saves.append(p)
        if p == phase and len(saves) == 2:  # the save of step 4, which would replace (keep_last=1) step 2
            raise Crash(phase)

    monkeypatch.setattr(ckpt, "FAULT_HOOK", crash_in_second_save)
    with pytest.raises(Crash):
        main(_cfg(tmp_path, shards))
    monkeypatch.setattr(ckpt, "FAULT_HOOK", None)

    root = tmp_path / "checkpoints"
    step4 = root / "step_00000004"
    marked = phase in ("marked", "pruning")  # the marker was in place: step 4 is complete, step 2 may go
    assert ckpt.check_complete(step4)[0] == marked
    if phase == "marker_temp":  # marker content fsynced under a temp name, never renamed: not a marker
        assert list(step4.glob(".COMPLETE.json.tmp-*")) and not (step4 / ckpt.MARKER).exists()
    if not marked:  # retention never deleted the last complete checkpoint for a save that did not finish
        assert ckpt.check_complete(root / "step_00000002") == (True, "")
    expected = "step_00000004" if marked else "step_00000002"
    assert ckpt.latest_complete(root).name == expected
    # DeepSpeed's `latest` (for its zero_to_fp32.py) only ever names a complete checkpoint
    assert ckpt.check_complete(root / (root / ckpt.DS_POINTER).read_text()) == (True, "")
    assert (root / ckpt.DS_POINTER).read_text() == ("step_00000004" if phase == "pruning" else "step_00000002")

    result = main(_cfg(tmp_path, shards))
    assert result["resumed_from"].name == expected
    resumed_at = int(expected[-1])
    assert result["losses"] == straight["losses"][resumed_at:]
    ef.assert_same_weights(ef.weights(result["engine"]), straight["weights"])
    assert _metric_steps(tmp_path) == list(range(1, MAX_STEPS + 1))  # redone steps logged once
    assert [p.name for p in root.glob("step_*")] == ["step_00000006"] and not list(root.glob(".trash-*"))
    assert (root / ckpt.POINTER).read_text() == "step_00000006\n" and (root / ckpt.DS_POINTER).read_text() == "step_00000006"


def test_sigkill_mid_file_write(tmp_path, shards, straight):
    """A real kill -9 while DeepSpeed's optimizer-state file of step 4 is half written."""
    from pretraining.trainer import main

    script = textwrap.dedent(f"""
        import io, os, signal, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import engine_fixtures as ef
        from pretraining.trainer import main
        torch.set_num_threads(1)
        real_save = torch.save
        def torn_save(obj, f, *args, **kwargs):
            if "step_00000004" in str(f) and "optim_states" in str(f):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = torn_save
        run = ef.tiny_run(Path({str(tmp_path)!r}), Path({str(shards)!r}), Path({str(shards)!r}), max_steps={MAX_STEPS},
                          checkpoint={{"every_steps": 2, "keep_last": 1}})
        run["logging"] = {{"progress_bar": False, "tensorboard": False}}
        main(ef.load_tiny(run))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ef.clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    step4 = tmp_path / "checkpoints" / "step_00000004"
    torn = next(step4.glob("*optim_states.pt"))
    assert torn.stat().st_size > 0 and not (step4 / ckpt.MARKER).exists()
    assert ckpt.latest_complete(tmp_path / "checkpoints").name == "step_00000002"
    with pytest.raises(ValueError, match="incomplete checkpoint.*no COMPLETE.json"):
        ckpt.resolve(step4)
    result = main(_cfg(tmp_path, shards))
    assert result["resumed_from"].name == "step_00000002" and result["losses"] == straight["losses"][2:]
    ef.assert_same_weights(ef.weights(result["engine"]), straight["weights"])
    assert _metric_steps(tmp_path) == list(range(1, MAX_STEPS + 1))


def test_stage_change_refused_with_recipe_that_continues_the_data(tmp_path, shards, straight):
    """Resume under another ZeRO stage: refused before anything loads, naming the conversion; following it (export,
    model.init=<export>, data.start_sample=<samples consumed>) continues with exactly the next samples."""
    from pretraining.export import export
    from pretraining.trainer import main

    first_ids = ef.SampleLog()
    first = main(_cfg(tmp_path / "a", shards, max_steps=2), on_micro=first_ids)
    with pytest.raises(ValueError, match=r"(?s)saved by 1 ranks with ZeRO stage 2; this run has 1 ranks and ZeRO "
                                         r"stage 1.*biobert export .*model\.init=OUT data\.start_sample=16"):
        main(_cfg(tmp_path / "a", shards, max_steps=4, overrides=["ds.zero_optimization.stage=1"]))
    hf = export(tmp_path / "a" / "checkpoints", tmp_path / "hf")
    ids = ef.SampleLog()
    second = main(_cfg(tmp_path / "b", shards, max_steps=2, overrides=[
        "ds.zero_optimization.stage=1", f"model.init={hf}", "data.start_sample=16"]), on_micro=ids)
    assert second["resumed_from"] is None and [r["samples_consumed"] for r in second["records"]] == [24, 32]
    seen = [i for s in (first_ids.steps, ids.steps) for step in sorted(s) for i in s[step]]
    assert seen == [i for step in range(1, 5) for i in straight["ids"][step]]  # as uninterrupted: none lost/repeated
    assert len(set(seen)) == 32 and first["samples_consumed"] == 16
    # the exported weights are the trained ones: the new run's first loss is close to the old run's last
    assert abs(second["losses"][0] - first["losses"][-1]) < 0.5


def test_stage_change_through_universal_checkpoint(tmp_path, shards, straight):
    """checkpoint.reshard=universal: DeepSpeed's ds_to_universal + load_universal carry weights, optimizer moments,
    lr schedule and data position from ZeRO-2 to ZeRO-1; the run continues as if nothing changed."""
    from pretraining.trainer import main

    main(_cfg(tmp_path, shards, max_steps=2, overrides=[f"schedule.total_steps={MAX_STEPS}"]))  # same lr schedule
    ids = ef.SampleLog()
    result = main(_cfg(tmp_path, shards, overrides=["ds.zero_optimization.stage=1", "checkpoint.reshard=universal"]),
                  on_micro=ids)
    assert result["resumed_from"].name == "step_00000002"
    assert [r["lr"] for r in result["records"]] == straight["lr"][2:]  # scheduler state came along
    assert ids.steps == {s: straight["ids"][s] for s in range(3, MAX_STEPS + 1)}  # the data position too
    torch.testing.assert_close(result["losses"], straight["losses"][2:], rtol=1e-5, atol=0)  # and Adam's moments
    assert not list((tmp_path / "checkpoints").glob(".universal-*"))  # the converted copy is removed after loading


def test_truncate_metrics_keeps_steps_up_to_resume(tmp_path):
    from pretraining.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in (1, 2, 3)] + [{"summary": {"final_step": 3, "preempted": True}}]
    lines += [{"step": s, "loss": 2.0} for s in (4, 5, 6)]  # a run killed after step 6, last checkpoint at 4
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "lo')  # torn last line
    assert truncate_metrics(path, 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x.get("step", "summary") for x in kept] == [1, 2, 3, "summary", 4]
    assert truncate_metrics(path, 4) == 0 and not list(tmp_path.glob(".*tmp"))


def test_global_batch_change_refused(tmp_path, shards):
    from pretraining.trainer import main

    main(_cfg(tmp_path, shards, max_steps=2))
    with pytest.raises(ValueError, match="trained with global batch 8, this run has 16"):
        main(_cfg(tmp_path, shards, max_steps=4, overrides=["ds.train_batch_size=16"]))


def test_universal_route_needs_zero_partitions(tmp_path, shards):
    from pretraining.trainer import main

    main(_cfg(tmp_path, shards, max_steps=2, overrides=["ds.zero_optimization.stage=0"]))
    with pytest.raises(ValueError, match=r"(?s)universal checkpoint needs ZeRO stage 1-3.*stage 0.*biobert export"):
        main(_cfg(tmp_path, shards, max_steps=4, overrides=["ds.zero_optimization.stage=1",
                                                             "checkpoint.reshard=universal"]))


def test_fresh_run_refuses_to_overwrite_another_runs_checkpoints(tmp_path, shards):
    from pretraining.trainer import main

    main(_cfg(tmp_path, shards, max_steps=2))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="resume=never but .*checkpoints already holds complete checkpoints"):
        main(_cfg(tmp_path, shards, max_steps=2, overrides=["checkpoint.resume=never"]))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert ckpt.check_complete(tmp_path / "checkpoints" / "step_00000002") == (True, "")
