"""Export: ZeRO-3 checkpoint (padded vocab) -> HF directory -> transformers loads it with the engine's logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pretraining import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, shared_data, minilm_dir):
    """Two steps of a tiny BERT under ZeRO-3 (one rank), vocab padded 30522 -> 30528; the live engine comes back."""
    from pretraining.trainer import main

    shards = ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)
    out = tmp_path_factory.mktemp("zero3")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = ef.tiny_run(out, shards, minilm_dir, max_steps=2,
                          model={"overrides": {"pad_vocab_multiple": 8, "hidden_dropout_prob": 0.0}})
        result = main(ef.load_tiny(run, ["ds.zero_optimization.stage=3", "ds.train_batch_size=2"]))
    finally:
        torch.set_num_threads(n)
    return out, result


def _inputs(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return ids, torch.zeros_like(ids), mask


def test_export_zero3_matches_engine_logits(zero3_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

    from pretraining.export import cli as export_cli

    out, result = zero3_run
    engine = result["engine"]
    assert engine.zero_optimization_stage() == 3
    hf_dir = tmp_path / "hf"
    assert export_cli([str(out / "checkpoints"), str(hf_dir)]) == 0
    hf, info = AutoModelForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert hf.config.vocab_size == 30522 and "pad_vocab_multiple" not in hf.config.to_dict()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("bert.embeddings.word_embeddings.weight")
    assert emb.shape[0] == 30522 and emb.dtype == torch.float32  # padding rows sliced off
    assert AutoTokenizer.from_pretrained(hf_dir).vocab_size == 30522
    assert AutoModel.from_pretrained(hf_dir).config.hidden_size == 64

    ids, types, mask = _inputs(30522)
    engine.eval()
    with torch.no_grad():
        mine = engine(input_ids=ids, token_type_ids=types, attention_mask=mask, return_logits=True)  # ZeRO-3 gathers
        theirs = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    engine.train()
    real = mask.bool()
    torch.testing.assert_close(theirs.prediction_logits[real], mine["prediction_logits"][real][:, :30522],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.seq_relationship_logits, mine["seq_relationship_logits"], atol=1e-4, rtol=1e-4)


def test_export_refuses_incomplete_checkpoint(zero3_run, tmp_path):
    import shutil

    from pretraining.export import export

    out, _ = zero3_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    folder = copy / "step_00000002"
    (folder / ckpt.MARKER).unlink()
    with pytest.raises(ValueError, match="incomplete checkpoint.*step_00000002.*no COMPLETE.json"):
        export(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    ckpt.mark_complete(folder, step=2, world_size=1, zero_stage=3)
    victim = next(folder.glob("*optim_states.pt"))
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated"):
        export(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
