"""NVIDIA ckpt_N.pt and TF checkpoint import -> HF directory with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from transformers import BertConfig

from pretraining import convert
from pretraining.model import BertForPreTraining

CFG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
           attention_probs_dropout_prob=0.1, initializer_range=0.02)


def tiny_model(seed=0) -> BertForPreTraining:
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig(**CFG)).eval()
    with torch.no_grad():  # non-zero biases / LayerNorms so a mis-mapped tensor shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def write_vocab(path, n=99, cased=False):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"{'Tok' if cased else 'tok'}{i}" for i in range(n - len(specials))]
    path.write_text("\n".join(specials + words) + "\n")
    return path


def nvidia_state_dict(model: BertForPreTraining) -> dict[str, torch.Tensor]:
    """What NVIDIA's modeling.py saves: DDP prefix, `dense_act` names, vocab padded 99 -> 104."""
    sd = {}
    for key, value in model.state_dict().items():
        key = (key.replace("intermediate.dense.", "intermediate.dense_act.")
               .replace("pooler.dense.", "pooler.dense_act.").replace("transform.dense.", "transform.dense_act."))
        if key.endswith(("word_embeddings.weight", "decoder.weight", "predictions.bias")):
            value = torch.cat([value, torch.randn(5, *value.shape[1:])])
        sd["module." + key] = value.clone()
    return sd


def logits(model_or_hf, ids, mask):
    with torch.no_grad():
        if isinstance(model_or_hf, BertForPreTraining):
            out = model_or_hf(ids, None, mask, return_logits=True)
            return out["prediction_logits"], out["seq_relationship_logits"]
        out = model_or_hf(input_ids=ids, attention_mask=mask)
        return out.prediction_logits, out.seq_relationship_logits


def test_nvidia_checkpoint_round_trips_to_equal_logits(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "ckpt_8601.pt"
    torch.save({"model": nvidia_state_dict(model), "optimizer": {"state": {}}, "files": [3, 4], "epoch": 1}, ckpt)
    (tmp_path / "bert_config.json").write_text(json.dumps(CFG))
    vocab = write_vocab(tmp_path / "vocab.txt")
    out = convert.main(convert.ConvertConfig(source="nvidia", checkpoint=str(ckpt), vocab=str(vocab),
                                             config=str(tmp_path / "bert_config.json"), out_dir=str(tmp_path / "hf")))

    hf = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    assert hf.config.vocab_size == 99 and hf.bert.embeddings.word_embeddings.weight.shape == (99, 32)
    ids = torch.randint(5, 99, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    (a_mlm, a_nsp), (b_mlm, b_nsp) = logits(model, ids, mask), logits(hf, ids, mask)
    torch.testing.assert_close(a_mlm[mask.bool()], b_mlm[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_nsp, b_nsp, atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("tok7") == 12 and tok("TOK7")["input_ids"] == [2, 12, 3]  # lower-cased


def test_nvidia_bad_inputs(tmp_path):
    (tmp_path / "bert_config.json").write_text(json.dumps(CFG))
    torch.save({"model": {"module.something": torch.zeros(1)}}, tmp_path / "ckpt_1.pt")
    with pytest.raises(ValueError, match="ckpt_1.pt: no BERT state dict"):
        convert.cli(["--from", "nvidia", str(tmp_path / "ckpt_1.pt"), "--config", str(tmp_path / "bert_config.json"),
                      "--vocab", str(write_vocab(tmp_path / "vocab.txt")), str(tmp_path / "out")])
    torch.save({"model": nvidia_state_dict(tiny_model())}, tmp_path / "ckpt_2.pt")
    with pytest.raises(ValueError, match="embedding has 104 rows but .*vocab_big.txt has 200 tokens"):
        convert.cli(["--from", "nvidia", str(tmp_path / "ckpt_2.pt"), "--config", str(tmp_path / "bert_config.json"),
                      "--vocab", str(write_vocab(tmp_path / "vocab_big.txt", 200)), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def tf_variables(model: BertForPreTraining) -> dict[str, np.ndarray]:
    """The variable names of Google's TF BERT (modeling.py / run_pretraining.py), filled from `model`."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tf = {
        "bert/embeddings/word_embeddings": sd["bert.embeddings.word_embeddings.weight"],
        "bert/embeddings/position_embeddings": sd["bert.embeddings.position_embeddings.weight"],
        "bert/embeddings/token_type_embeddings": sd["bert.embeddings.token_type_embeddings.weight"],
        "bert/embeddings/LayerNorm/gamma": sd["bert.embeddings.LayerNorm.weight"],
        "bert/embeddings/LayerNorm/beta": sd["bert.embeddings.LayerNorm.bias"],
        "bert/pooler/dense/kernel": sd["bert.pooler.dense.weight"].T,
        "bert/pooler/dense/bias": sd["bert.pooler.dense.bias"],
        "cls/predictions/transform/dense/kernel": sd["cls.predictions.transform.dense.weight"].T,
        "cls/predictions/transform/dense/bias": sd["cls.predictions.transform.dense.bias"],
        "cls/predictions/transform/LayerNorm/gamma": sd["cls.predictions.transform.LayerNorm.weight"],
        "cls/predictions/transform/LayerNorm/beta": sd["cls.predictions.transform.LayerNorm.bias"],
        "cls/predictions/output_bias": sd["cls.predictions.bias"],
        "cls/seq_relationship/output_weights": sd["cls.seq_relationship.weight"],
        "cls/seq_relationship/output_bias": sd["cls.seq_relationship.bias"],
        "global_step": np.int64(1000000),
    }
    for i in range(2):
        p, t = f"bert.encoder.layer.{i}.", f"bert/encoder/layer_{i}/"
        for tf_sub, our_sub in [("attention/self/query", "attention.self.query"),
                                ("attention/self/key", "attention.self.key"),
                                ("attention/self/value", "attention.self.value"),
                                ("attention/output/dense", "attention.output.dense"),
                                ("intermediate/dense", "intermediate.dense"), ("output/dense", "output.dense")]:
            tf[t + tf_sub + "/kernel"] = sd[p + our_sub + ".weight"].T
            tf[t + tf_sub + "/bias"] = sd[p + our_sub + ".bias"]
        for tf_sub, our_sub in [("attention/output/LayerNorm", "attention.output.LayerNorm"),
                                ("output/LayerNorm", "output.LayerNorm")]:
            tf[t + tf_sub + "/gamma"] = sd[p + our_sub + ".weight"]
            tf[t + tf_sub + "/beta"] = sd[p + our_sub + ".bias"]
    for name in list(tf):
        if name != "global_step":
            tf[name + "/adam_m"] = np.zeros_like(tf[name])
            tf[name + "/adam_v"] = np.ones_like(tf[name])
    return tf


def test_tf_name_mapping(tmp_path):
    model = tiny_model()
    state_dict, skipped = convert.tf_to_hf_state_dict(tf_variables(model))
    assert "global_step" in skipped and len(skipped) == 1 + 2 * (len(state_dict))
    expected = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
    assert sorted(state_dict) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key

    fresh = BertForPreTraining(BertConfig(**CFG)).eval()
    convert.load_state_dict_into(fresh, state_dict, "tf")
    ids, mask = torch.randint(5, 99, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    torch.testing.assert_close(logits(fresh, ids, mask), logits(model, ids, mask))


def test_tf_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name == "tensorflow":
            raise ImportError("No module named 'tensorflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    (tmp_path / "bert_config.json").write_text(json.dumps(CFG))
    with pytest.raises(ValueError, match=r"needs TensorFlow: pip install '\.\[tf\]'"):
        convert.cli(["--from", "tf", str(tmp_path / "model.ckpt-1000000"), "--config",
                      str(tmp_path / "bert_config.json"), "--vocab", str(write_vocab(tmp_path / "vocab.txt")),
                      str(tmp_path / "out")])
