"""Head warm-up: a start without MLM/NSP heads trains only those heads first, the loaded weights bit-identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pretraining.optim import build_scheduler, head_warmup_multipliers, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def headless(tmp_path_factory, shards) -> Path:
    """A tiny HF *BertModel* directory (no cls.* weights), as the packaged MiniLM is, on the synthetic vocab."""
    from transformers import BertConfig

    from pretraining.config import PRESETS
    from pretraining.model import BertModel, save_pretrained

    torch.manual_seed(3)
    model = BertModel(BertConfig(vocab_size=ef.SYNTH["vocab_size"], **PRESETS["tiny"]))
    return save_pretrained(model, tmp_path_factory.mktemp("headless") / "model", tokenizer_dir=shards)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("optimizer,stage", [("adamw", 2), ("lamb", 0)])
def test_loaded_weights_stand_still_while_fresh_heads_learn(tmp_path, shards, headless, optimizer, stage):
    from pretraining.trainer import main

    snaps = {}

    def grab(step, engine):  # before step `step`: the weights after step - 1
        snaps[step - 1] = _snapshot(engine.module)

    cfg = ef.synth_cfg(tmp_path / "out", shards, max_steps=6, model={"init": str(headless), "head_warmup_steps": 3},
                       schedule={"warmup_steps": 1},
                       overrides=[f"optimizer.name={optimizer}", f"ds.zero_optimization.stage={stage}"])
    result = main(cfg, on_step=grab)
    snaps[6] = _snapshot(result["engine"].module)
    fresh = {k for k in snaps[0] if k.startswith("cls.") and k != "cls.predictions.decoder.weight"}
    loaded = set(snaps[0]) - fresh - {"cls.predictions.decoder.weight"}  # the decoder is the word embedding
    assert fresh and "bert.embeddings.word_embeddings.weight" in loaded
    for k in loaded:  # steps 1-3: not a bit of the loaded weights moves (no decay either)
        assert torch.equal(snaps[3][k], snaps[0][k]), k
    assert all(not torch.equal(snaps[3][k], snaps[0][k]) for k in ("cls.predictions.transform.dense.weight",
                                                                   "cls.seq_relationship.weight"))
    moved = [k for k in loaded if not torch.equal(snaps[6][k], snaps[3][k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved and len(moved) > len(loaded) // 2

    records = result["records"]
    assert [r["head_warmup"] for r in records] == [True] * 3 + [False] * 3
    assert all(r["lr"] == 0 and r["lr_heads"] > 0 for r in records[:3]) and all(r["lr"] > 0 for r in records[3:])
    assert result["summary"]["head_warmup_steps"] == 3


def test_auto_warms_only_a_start_that_lacks_heads(tmp_path, shards, headless):
    from pretraining.config import HEAD_WARMUP_AUTO
    from pretraining.model import BertForPreTraining
    from pretraining.trainer import build_model
    from pretraining.warm_start import resolve_head_warmup

    cfg = ef.synth_cfg(tmp_path / "a", shards, max_steps=2000, model={"init": str(headless)})
    model, _ = build_model(cfg)
    steps, fresh = resolve_head_warmup(cfg, model)
    assert steps == HEAD_WARMUP_AUTO and fresh == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    short = ef.synth_cfg(tmp_path / "b", shards, max_steps=30, model={"init": str(headless)})
    assert resolve_head_warmup(short, model)[0] == 3  # at most a tenth of the schedule

    from pretraining.model import save_pretrained

    full = save_pretrained(BertForPreTraining(model.config), tmp_path / "full", tokenizer_dir=shards)
    cfg_full = ef.synth_cfg(tmp_path / "c", shards, max_steps=2000, model={"init": str(full)})
    assert resolve_head_warmup(cfg_full, build_model(cfg_full)[0]) == (0, frozenset())  # has its heads
    scratch = ef.synth_cfg(tmp_path / "d", shards, max_steps=2000)
    assert resolve_head_warmup(scratch, build_model(scratch)[0]) == (0, frozenset())
    asked = ef.synth_cfg(tmp_path / "e", shards, max_steps=2000, model={"init": str(full), "head_warmup_steps": 50})
    with pytest.raises(ValueError, match="no fresh heads to warm up"):
        resolve_head_warmup(asked, build_model(asked)[0])


def test_config_refuses_a_warmup_that_leaves_nothing(tmp_path, shards):
    with pytest.raises(ValueError, match="no step would train the whole model"):
        ef.synth_cfg(tmp_path, shards, max_steps=10, model={"init": "minilm", "head_warmup_steps": 8},
                     schedule={"warmup_steps": 2})
    with pytest.raises(ValueError, match="auto or a step count"):
        ef.synth_cfg(tmp_path, shards, max_steps=10, model={"init": "minilm", "head_warmup_steps": "soon"})


def test_scheduler_factors_per_group():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    groups = param_groups(model, 0.01, fresh={"1.weight", "1.bias"})
    assert [(g["fresh"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (False, 0.01, 1), (False, 0.0, 1), (True, 0.01, 1), (True, 0.0, 1)]
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10, head_warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    loaded, heads = [x[0] for x in lrs], [x[2] for x in lrs]
    assert loaded == [0, 0, 0, 0, 0.5, 1.0, 1.0, 0.75, 0.5, 0.25]  # own 2-step warmup, decay over steps [4, 10)
    assert heads == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]  # no re-ramp after the warm-up
    assert head_warmup_multipliers(0, 0, 2, 10) == (0.5, 0.5)  # no warm-up: both follow the plain schedule
    with pytest.raises(ValueError, match="fresh parameter groups"):
        build_scheduler(torch.optim.AdamW(model.parameters()), 2, 10, head_warmup_steps=4)


def test_mlm_bias_starts_at_the_shards_log_unigram_prior(tmp_path, shards, headless):
    import h5py
    import numpy as np

    from pretraining.model import BertForPreTraining, save_pretrained
    from pretraining.trainer import build_model
    from pretraining.warm_start import init_mlm_bias, unigram_log_prior

    prior = unigram_log_prior(shards, 100, special_ids=range(5))
    counts = np.zeros(100)
    for f in sorted(shards.glob("*.hdf5")):  # every token of the synthetic shards (far below the read budget)
        with h5py.File(f) as h:
            ids, real = h["input_ids"][:], h["input_mask"][:].astype(bool)
            counts += np.bincount(ids[real], minlength=100)
            counts += np.bincount(h["masked_lm_ids"][:][h["masked_lm_positions"][:] != 0], minlength=100)
    counts[:5] = 0
    expected = np.log((counts + 1) / (counts + 1).sum())
    assert torch.allclose(prior, torch.from_numpy(expected).float(), atol=1e-5)
    assert float(torch.logsumexp(prior, 0)) == pytest.approx(0.0, abs=1e-5)

    cfg = ef.synth_cfg(tmp_path / "a", shards, max_steps=20, model={"init": str(headless)})
    model, _ = build_model(cfg)
    assert init_mlm_bias(cfg, model, range(5)) == "prior"
    assert torch.equal(model.cls.predictions.bias.detach()[:100], prior)
    scratch = ef.synth_cfg(tmp_path / "b", shards, max_steps=20)
    model, _ = build_model(scratch)
    assert init_mlm_bias(scratch, model) == "zero" and not model.cls.predictions.bias.detach().any()  # BERT's init
    full = save_pretrained(BertForPreTraining(model.config), tmp_path / "full", tokenizer_dir=shards)
    asked = ef.synth_cfg(tmp_path / "c", shards, max_steps=20, model={"init": str(full), "mlm_bias_init": "prior"})
    with pytest.raises(ValueError, match="has a trained MLM bias"):
        init_mlm_bias(asked, build_model(asked)[0])
