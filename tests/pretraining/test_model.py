"""Our BERT against transformers' reference implementation: same weights, same inputs -> same logits, loss, gradients."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import transformers
from subproc import run_group
from transformers import BertConfig

from pretraining.model import (
    BertForPreTraining,
    BertModel,
    init_weights,
    load_pretrained,
    save_pretrained,
    training_flops_per_sequence,
)


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def make_batch(vocab=99, B=4, T=16, P=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([T, 11, 6, 3])[:B]
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    ids = torch.randint(5, vocab, (B, T), generator=g) * mask
    segments = ((torch.arange(T)[None] >= lens[:, None] // 2).long()) * mask
    positions = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        k = min(P, n - 1) - (b == 1)  # row 1 leaves a slot unused
        positions[b, :k] = torch.randperm(n - 1, generator=g)[:k] + 1
    labels_ids = torch.randint(5, vocab, (B, P), generator=g) * (positions != 0)
    nsp = torch.tensor([0, 1, 1, 0])[:B]
    return dict(input_ids=ids, token_type_ids=segments, attention_mask=mask, masked_lm_positions=positions,
                masked_lm_ids=labels_ids, next_sentence_labels=nsp)


def hf_labels(batch):
    labels = torch.full_like(batch["input_ids"], -100)
    for b in range(labels.shape[0]):
        for pos, tok in zip(batch["masked_lm_positions"][b].tolist(), batch["masked_lm_ids"][b].tolist()):
            if pos:
                labels[b, pos] = tok
    return labels


def hf_twin(ours: BertForPreTraining) -> transformers.BertForPreTraining:
    """transformers' model with exactly our weights (padded vocab rows sliced off)."""
    cfg = BertConfig(**{k: v for k, v in ours.config.to_dict().items() if k != "pad_vocab_multiple"})
    hf = transformers.BertForPreTraining(cfg).eval()
    V = cfg.vocab_size
    sd = {k: (v[:V] if k.endswith(("word_embeddings.weight", "predictions.bias", "decoder.weight")) else v)
          for k, v in ours.state_dict().items()}
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    hf.load_state_dict(sd, strict=True)
    return hf


@pytest.mark.parametrize("pad_vocab_multiple", [1, 8])
def test_logits_loss_and_grads_match_transformers(pad_vocab_multiple):
    torch.manual_seed(0)
    ours = BertForPreTraining(tiny_config(pad_vocab_multiple=pad_vocab_multiple)).eval()
    assert ours.bert.embeddings.word_embeddings.weight.shape[0] == (104 if pad_vocab_multiple == 8 else 99)
    hf = hf_twin(ours)
    batch = make_batch()

    out = ours(**batch, return_logits=True)
    ref = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
             attention_mask=batch["attention_mask"], labels=hf_labels(batch),
             next_sentence_label=batch["next_sentence_labels"])
    real = batch["attention_mask"].bool()
    assert out["prediction_logits"].shape == ref.prediction_logits.shape
    torch.testing.assert_close(out["prediction_logits"][real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["seq_relationship_logits"], ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], ref.loss, atol=1e-5, rtol=1e-5)
    assert int(out["mlm_count"]) == int((batch["masked_lm_positions"] != 0).sum())

    out["loss"].backward()
    ref.loss.backward()
    V = 99
    ours_grad = ours.bert.embeddings.word_embeddings.weight.grad
    torch.testing.assert_close(ours_grad[:V], hf.bert.embeddings.word_embeddings.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.bert.encoder.layer[0].attention.self.query.weight.grad,
                               hf.bert.encoder.layer[0].attention.self.query.weight.grad, atol=1e-5, rtol=1e-4)
    if pad_vocab_multiple == 8:  # padded rows are outside every softmax: no gradient at all
        assert ours_grad[V:].abs().max() == 0


def test_decoder_is_tied_and_mlm_accuracy_counts():
    model = BertForPreTraining(tiny_config()).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    batch = make_batch()
    with torch.no_grad():
        logits = model(**batch, return_logits=True)["prediction_logits"]
        # make every used label the argmax -> all correct
        pos = batch["masked_lm_positions"]
        best = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
        batch["masked_lm_ids"] = torch.where(pos != 0, best, 0)
        out = model(**batch)
    assert int(out["mlm_correct"]) == int(out["mlm_count"]) == int((pos != 0).sum())


def test_no_used_slots_gives_zero_mlm_loss_not_nan():
    model = BertForPreTraining(tiny_config())
    batch = make_batch()
    batch["masked_lm_positions"].zero_()
    out = model(**batch)
    assert out["mlm_loss"].item() == 0.0 and int(out["mlm_count"]) == 0 and torch.isfinite(out["loss"])


def test_unpadded_equals_padded_full_length_batch():
    """Padding must not change real tokens' outputs: each sequence alone == same sequence inside a padded batch."""
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch()
    with torch.no_grad():
        seq, pooled = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            s1, p1 = model.bert(batch["input_ids"][b:b + 1, :n], batch["token_type_ids"][b:b + 1, :n])
            torch.testing.assert_close(seq[b, :n], s1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled[b], p1[0], atol=1e-5, rtol=1e-5)
            assert seq[b, n:].abs().max() == 0 if n < seq.shape[1] else True


def test_dropout_in_train_mode_only():
    model = BertForPreTraining(tiny_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    batch = make_batch()
    model.train()
    a, b = model(**batch)["loss"], model(**batch)["loss"]
    assert a.item() != b.item()
    model.eval()
    with torch.no_grad():
        assert model(**batch)["loss"].item() == model(**batch)["loss"].item()


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = BertForPreTraining(tiny_config()).train()
    ckpt = BertForPreTraining(tiny_config(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.bert.encoder.activation_checkpointing
    batch = make_batch()
    plain(**batch)["loss"].backward()
    ckpt(**batch)["loss"].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_half_parameters_close_to_fp32(dtype):
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch()
    with torch.no_grad():
        ref = model(**batch)["loss"]
        with torch.autocast("cpu", dtype=dtype):
            low = model(**batch)["loss"]
        half = model.to(dtype)(**batch)  # DeepSpeed bf16/fp16: the parameters themselves are half precision
    assert low.dtype == half["loss"].dtype == torch.float32  # losses are always computed in fp32
    for loss in (low, half["loss"]):
        assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_minilm_encoder_matches_transformers_on_real_text(minilm_dir):
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    text = ["The BRCA1 gene encodes a nuclear phosphoprotein that maintains genomic stability.",
            "Aspirin inhibits cyclooxygenase.", "p53 mutations occur in over half of human cancers, "
            "including lung and colorectal carcinoma."]
    enc = tok(text, padding=True, return_tensors="pt")
    ours = load_pretrained(minilm_dir, BertModel)
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        seq, pooled = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        ref = hf(**enc)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(seq[real], ref.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-4, rtol=1e-4)

    # The same BertModel-only weights load into the pretraining model: heads fresh, decoder tied.
    full = load_pretrained(minilm_dir)
    assert full.cls.predictions.decoder.weight is full.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(full.bert.encoder.layer[3].output.dense.weight, ours.encoder.layer[3].output.dense.weight)


def test_save_pretrained_is_an_ordinary_hf_model(tmp_path, minilm_dir):
    torch.manual_seed(1)
    model = BertForPreTraining(tiny_config(pad_vocab_multiple=8, activation_checkpointing=True)).eval()
    out = save_pretrained(model, tmp_path / "export", tokenizer_dir=minilm_dir)
    assert (out / "vocab.txt").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 99 and "pad_vocab_multiple" not in cfg and "activation_checkpointing" not in cfg
    assert cfg["architectures"] == ["BertForPreTraining"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    hf = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    batch = make_batch()
    with torch.no_grad():
        ours = model(**batch, return_logits=True)
        ref = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours["prediction_logits"][real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)

    again = load_pretrained(out, pad_vocab_multiple=8)  # and back into ours, padded again
    assert again.bert.embeddings.word_embeddings.weight.shape[0] == 104
    with torch.no_grad():
        torch.testing.assert_close(again(**batch)["loss"], model(**batch)["loss"])

    save_pretrained(again, out)  # overwriting an existing export works and stays complete
    assert transformers.BertForPreTraining.from_pretrained(str(out)).config.vocab_size == 99


def test_load_errors_are_clear(tmp_path):
    model = BertForPreTraining(tiny_config())
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"(?s)model.safetensors: \d+ shape mismatches.*LayerNorm.*\(32,\) vs model \(64,\)"):
        load_pretrained(tmp_path / "m", hidden_size=64, num_attention_heads=4)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    del sd["bert.encoder.layer.1.output.dense.weight"]
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder weights missing.*layer.1.output.dense.weight"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_init_weights():
    cfg = tiny_config(hidden_size=256, intermediate_size=512, initializer_range=0.05)
    model = BertForPreTraining(cfg)
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - 0.05) < 0.005
    assert model.bert.encoder.layer[0].intermediate.dense.bias.abs().max() == 0
    assert model.bert.embeddings.word_embeddings.weight[0].abs().max() == 0  # padding row
    ln = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(ln.weight)
    init_weights(ln, cfg)
    assert ln.weight.eq(1).all() and ln.bias.eq(0).all()


def test_training_flops_per_sequence_hand_computed():
    # BERT-base, seq 128, 20 masked positions.
    cfg = BertConfig()  # H=768, F=3072, L=12, V=30522
    H, F, V = 768, 3072, 30522
    layer = 4 * (H * H + H) + 2 * H * F + F + H + 4 * H
    assert layer == 7_087_872
    expected = (6 * layer * 12 * 128  # encoder matmuls
                + 12 * 12 * 768 * 128 * 128  # attention scores and weighted sum
                + 6 * 20 * (H * H + 3 * H + H * V + V)  # MLM head at masked positions
                + 6 * (H * H + 3 * H + 2))  # pooler + NSP
    assert expected == 65_321_828_352 + 1_811_939_328 + 2_887_625_520 + 3_552_780  # ~70.0 GFLOP
    assert training_flops_per_sequence(cfg, 128, masked_positions=20) == float(expected)
    # Default masked positions: 15% of the sequence.
    assert training_flops_per_sequence(cfg, 128) == training_flops_per_sequence(cfg, 128, masked_positions=19)


@pytest.mark.slow
def test_zero3_two_ranks_tied_weights(tmp_path):
    """Real 2-rank DeepSpeed ZeRO-3 (CPU): partitioned tied decoder gets exactly the single-process update; bf16 runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("zero3_tied_check.py")
    out = tmp_path / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = run_group([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(script), str(out)],
                     env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["tied"]
    assert result["losses"][0] == pytest.approx(result["ref_losses"][0], abs=1e-6)
    assert result["losses"][1] == pytest.approx(result["ref_losses"][1], abs=1e-5)
    assert result["max_param_diff"] < 1e-5 and result["embedding_change"] > 0.01
    assert result["bf16_param_dtype"] == "torch.bfloat16"
    for low, ref in zip(result["bf16_losses"], result["ref_losses"]):
        assert low == pytest.approx(ref, rel=0.02)


def test_load_legacy_pytorch_model_bin(tmp_path):
    """Old HF / DeepSpeed dumps: pytorch_model.bin, LayerNorm.gamma/beta, module. prefix, explicit decoder copies."""
    torch.manual_seed(3)
    model = BertForPreTraining(tiny_config()).eval()
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["module." + key] = value.clone()
    legacy["module.cls.predictions.decoder.bias"] = legacy.pop("module.cls.predictions.bias")
    legacy["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    (tmp_path / "m").mkdir()
    torch.save(legacy, tmp_path / "m" / "pytorch_model.bin")
    (tmp_path / "m" / "config.json").write_text(model.config.to_json_string())
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["loss"], model(**batch)["loss"])
