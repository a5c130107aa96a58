"""The engine end to end on shards data_prep made from real PubMed abstracts, with a tiny BERT on CPU.

Launcher tests (slow) start `deepspeed --num_gpus 2` three times in all: one launch runs this file as a script (ZeRO 2,
1, 3 trainings in the same processes + a corrupted-shard check across both ranks), then run.py is killed with SIGKILL
after its first checkpoint and launched again to resume. Checks that need no launcher run in-process (one rank).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data, minilm_dir) -> Path:
    return ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # module scope: set before the module's `straight` runs, so both sides use one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # several helpers share 2 cores: OpenMP spinning slows a tiny model ~10x
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- in-process: preflight failures


def test_mismatched_vocab_fails_before_training(tmp_path, shards, minilm_dir):
    from pretraining.trainer import main

    other = tmp_path / "other_tokenizer"
    other.mkdir()
    tokens = (minilm_dir / "vocab.txt").read_text().splitlines()
    tokens[1000], tokens[1001] = tokens[1001], tokens[1000]  # same size, two ids swapped: only the hash can tell
    (other / "vocab.txt").write_text("\n".join(tokens) + "\n")
    cfg = ef.load_tiny(ef.tiny_run(tmp_path / "out", shards, other))
    with pytest.raises(ValueError, match="vocab mismatch"):
        main(cfg)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # not a single step ran


def test_corrupted_shard_fails_before_training(tmp_path, shards, minilm_dir):
    from shard_factory import flip_byte

    from pretraining.trainer import main

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    flip_byte(bad / "shard-00002-of-00004.hdf5")
    with pytest.raises(ValueError, match=r"shard-00002-of-00004\.hdf5.*sha256"):
        main(ef.load_tiny(ef.tiny_run(tmp_path / "out", bad, minilm_dir)))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_shard_skipped_only_when_asked(tmp_path, shards, minilm_dir):
    from shard_factory import flip_byte

    from pretraining.trainer import main

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    flip_byte(bad / "shard-00003-of-00004.hdf5")
    run = ef.tiny_run(tmp_path / "out", bad, minilm_dir, max_steps=1, data={"skip_bad_shards": True})
    result = main(ef.load_tiny(run, ["ds.train_batch_size=2"]))
    assert result["summary"]["bad_shards"] == 1 and len(result["losses"]) == 1


def test_continued_pretraining_from_hf_dir(tmp_path, shards):
    """model.init "minilm" (the packaged HF BertModel dir): encoder weights loaded, heads fresh, one step trains."""
    import json

    from safetensors.torch import load_file

    from pretraining.hub import resolve_model_dir
    from pretraining.trainer import main

    run = ef.tiny_run(tmp_path / "out", shards, None, max_steps=1, model={"init": "minilm", "tokenizer": None})
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    result = main(ef.load_tiny(run, ["ds.train_batch_size=2", "optimizer.lr=1e-12"]))
    assert {k: os.environ.get(k) for k in env_before} == env_before  # one process exports no rank variables
    assert len(result["losses"]) == 1 and 0 < result["losses"][0] < 20
    hf = result["checkpoint"] / "hf"
    assert json.loads((hf / "config.json").read_text())["hidden_size"] == 384 and (hf / "vocab.txt").is_file()
    trained = result["engine"].module.bert.embeddings.word_embeddings.weight.detach()
    original = load_file(str(resolve_model_dir("minilm") / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert torch.allclose(trained[: original.shape[0]], original, atol=1e-6)  # lr ~0: still MiniLM's weights


# ---------------------------------------------------------------- launcher: 2 ranks, ZeRO-2


def _matrix(out: Path, shard_dir: Path, tokenizer: Path) -> None:
    """Runs inside `deepspeed --num_gpus 2 test_engine.py --matrix ...`; each rank writes its findings."""
    from shard_factory import flip_byte

    from biobert import dist
    from pretraining.trainer import main

    found: dict = {}
    dist.init()
    bad = out / "bad_shards"
    if dist.rank() == 0:
        shutil.copytree(shard_dir, bad)
        flip_byte(bad / "shard-00001-of-00004.hdf5")  # rank 1 verifies odd shards: rank 0 must still hear of it
    dist.barrier()
    try:
        main(ef.load_tiny(ef.tiny_run(out / "bad_run", bad, tokenizer)))
    except ValueError as e:
        found["corrupt"] = str(e)
    for stage in (2, 1, 3):
        every = 4 if stage == 2 else 0
        run = ef.tiny_run(out / f"zero{stage}", shard_dir, tokenizer, checkpoint={"every_steps": every})
        result = main(ef.load_tiny(run, [f"ds.zero_optimization.stage={stage}"]))
        found[f"zero{stage}"] = result["losses"]
    (out / f"matrix_rank{dist.rank()}.json").write_text(json.dumps(found))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, shards, minilm_dir) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("matrix")
    cmd = ef.deepspeed_cmd(Path(__file__), "--matrix", str(out), str(shards), str(minilm_dir))
    proc = ef.run_launcher(cmd, out / "launcher.log")
    assert proc.returncode == 0, (out / "launcher.log").read_text()[-5000:]
    return out, [json.loads((out / f"matrix_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_loss_falls_and_ranks_agree(matrix):
    out, (r0, r1) = matrix
    losses = r0["zero2"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert r0["zero2"] == r1["zero2"]  # the per-step all-reduce gives every rank the same numbers
    assert ef.step_losses(out / "zero2") == dict(enumerate(losses, 1))  # metrics.jsonl (rank 0) holds them
    assert (out / "zero2" / "tensorboard").is_dir()


@pytest.mark.slow
def test_zero_stages_agree(matrix):
    import numpy as np

    _, (r0, _) = matrix
    for stage in ("zero1", "zero3"):
        np.testing.assert_allclose(r0[stage], r0["zero2"], rtol=2e-4, err_msg=stage)


@pytest.mark.slow
def test_corrupted_shard_named_on_every_rank(matrix):
    _, ranks = matrix
    for found in ranks:
        assert "shard-00001-of-00004.hdf5" in found["corrupt"] and "sha256" in found["corrupt"], found["corrupt"]


def _rank_pid(launcher_pid: int, local_rank: int) -> int | None:
    import psutil

    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in p.cmdline():
                return p.pid
        except psutil.Error:
            pass
    return None


def _wait_for(predicate, proc, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_signalled_and_resumed_run_reproduces_losses(matrix, tmp_path, shards, minilm_dir):
    """Launch 1: SIGKILL every process after the first checkpoint. Launch 2: resume, then SIGUSR1 to rank 1 only: both
    ranks save at the same step and exit 75. Launch 3: resume to the end. Losses = the uninterrupted run's, bit for bit."""
    _, (r0, _) = matrix
    out = tmp_path / "run"
    # total_steps pinned: launch 2 gets a far-away max_steps so it is surely still running when the signal lands
    run = ef.tiny_run(out, shards, minilm_dir, schedule={"total_steps": 12})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    args = ["--config", str(tmp_path / "run.yaml"), "--deepspeed_config", str(ef.TINY_DS), *ef.TINY_OVERRIDES,
            "ds.zero_optimization.stage=2"]
    script = ef.REPO / "pretraining" / "run.py"
    marker = out / "checkpoints" / "step_00000004" / "COMPLETE.json"

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(ef.deepspeed_cmd(script, *args), cwd=ef.REPO, env=ef.clean_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(marker.exists, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, mid-training
        proc.wait()
    assert marker.exists(), (tmp_path / "killed.log").read_text()[-5000:]
    killed_at = max(ef.step_losses(out))

    with open(tmp_path / "signalled.log", "w") as log:
        proc = subprocess.Popen(ef.deepspeed_cmd(script, *args, "max_steps=1000"), cwd=ef.REPO, env=ef.clean_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: max(ef.step_losses(out), default=0) > killed_at, proc)  # training again
            rank1 = _rank_pid(proc.pid, 1)
            assert rank1 is not None, (tmp_path / "signalled.log").read_text()[-5000:]
            os.kill(rank1, signal.SIGUSR1)
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:  # never leave ranks behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log_text = (tmp_path / "signalled.log").read_text()
    assert code == 75, log_text[-5000:]  # EXIT_PREEMPTED, passed on by the launcher
    stopped_at = max(ef.step_losses(out))
    saved = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert ckpt_complete(saved) and len(list(saved.glob("zero_pp_rank_*_optim_states.pt"))) == 2

    resumed = ef.run_launcher(ef.deepspeed_cmd(script, *args), tmp_path / "resumed.log")
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-5000:]
    losses = ef.step_losses(out)
    assert sorted(losses) == list(range(1, max(12, stopped_at) + 1)) and killed_at < 12
    assert {s: losses[s] for s in range(1, 13)} == dict(enumerate(r0["zero2"], 1))  # bit-identical, step for step


def ckpt_complete(folder: Path) -> bool:
    from pretraining.checkpoint import check_complete

    return check_complete(folder)[0]


@pytest.mark.slow
def test_export_of_two_rank_zero2_checkpoint(matrix, tmp_path):
    from transformers import AutoModel, AutoModelForPreTraining

    from pretraining.export import export, fp32_state_dict
    from pretraining.model import BertForPreTraining, load_state_dict_into

    ref_dir, _ = matrix
    hf_dir = export(ref_dir / "zero2" / "checkpoints", tmp_path / "hf")  # root -> newest complete (step 12)
    hf, info = AutoModelForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info
    AutoModel.from_pretrained(hf_dir)
    folder = ref_dir / "zero2" / "checkpoints" / "step_00000012"
    ours = BertForPreTraining(hf.config)
    load_state_dict_into(ours, fp32_state_dict(folder), str(folder))
    ids = torch.randint(5, hf.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        a = hf.eval()(input_ids=ids, attention_mask=mask)
        b = ours.eval()(input_ids=ids, attention_mask=mask, return_logits=True)
    torch.testing.assert_close(a.seq_relationship_logits, b["seq_relationship_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.prediction_logits[mask.bool()], b["prediction_logits"][mask.bool()], atol=1e-4,
                               rtol=1e-4)


if __name__ == "__main__" and "--matrix" in sys.argv:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--matrix", nargs=3)
    p.add_argument("--local_rank", type=int)
    a = p.parse_args()
    _matrix(*(Path(x) for x in a.matrix))
