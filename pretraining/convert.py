"""Import BERT checkpoints from NVIDIA DeepLearningExamples (`ckpt_N.pt`) or TensorFlow (Google BERT, original BioBERT)
into an ordinary HF directory (the format our pretraining and fine-tuning start from).

    biobert convert --from nvidia ckpt_8601.pt --config bert_config.json --vocab vocab.txt OUT_DIR
    biobert convert --from tf biobert_v1.1/model.ckpt-1000000 --config bert_config.json \
        --vocab vocab.txt OUT_DIR                                       # needs: pip install '.[tf]'

NVIDIA: the state dict sits under "model", keys may carry DDP's "module." prefix, LinearActivation layers are named
`dense_act`, and the vocab is padded to a multiple of 8 (sliced back to the vocab file's size here).
TF: variables map by name (kernels transposed); optimizer slots (adam_m/adam_v) and step counters are skipped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig

from biobert.config import option, parse
from biobert.errors import UserError, run
from pretraining.model import BertForPreTraining, load_state_dict_into, save_pretrained

log = logging.getLogger(__name__)

TF_SKIP = re.compile(r"(^|/)(adam_m|adam_v|global_step|good_steps|bad_steps|loss_scale|current_loss_scale)($|/)")
TF_EXTRA = "pip install '.[tf]'"


def nvidia_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA DeepLearningExamples BERT names -> HF BertForPreTraining names (pure renaming)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").replace(".dense_act.", ".dense.")
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def tf_to_hf_state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """TF BERT variable names -> HF names. Returns (state_dict, skipped optimizer/bookkeeping variable names).

    bert/encoder/layer_3/attention/self/query/kernel -> bert.encoder.layer.3.attention.self.query.weight (transposed)
    */LayerNorm/gamma|beta -> weight|bias; cls/predictions/output_bias -> cls.predictions.bias;
    cls/seq_relationship/output_weights -> cls.seq_relationship.weight (already [2, H]); *_embeddings -> .weight.
    """
    state_dict, skipped = {}, []
    for name, array in variables.items():
        if TF_SKIP.search(name):
            skipped.append(name)
            continue
        parts = []
        for part in name.split("/"):
            layer = re.fullmatch(r"layer_(\d+)", part)
            parts.append(f"layer.{layer.group(1)}" if layer else
                         {"kernel": "weight", "gamma": "weight", "beta": "bias", "output_bias": "bias",
                          "output_weights": "weight"}.get(part, part))
        if parts[-1].endswith("_embeddings"):
            parts.append("weight")
        tensor = torch.from_numpy(np.ascontiguousarray(array.T if name.endswith("/kernel") else array))
        state_dict[".".join(parts)] = tensor
    return state_dict, skipped


def read_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
    try:
        import tensorflow as tf
    except ImportError as e:
        raise UserError(f"reading TensorFlow checkpoints needs TensorFlow: {TF_EXTRA}") from e
    return {name: tf.train.load_variable(path, name) for name, _ in tf.train.list_variables(path)}


def read_nvidia_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if allow_pickle:
            raise
        raise ValueError(f"{path}: cannot be read as plain tensors ({type(e).__name__}: {str(e)[:200]}); if you trust "
                         f"the file, rerun with --allow-pickle") from e
    state_dict = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not any(k.endswith("word_embeddings.weight") for k in state_dict):
        raise ValueError(f"{path}: no BERT state dict found (expected NVIDIA's {{'model': state_dict, ...}})")
    return nvidia_to_hf_state_dict(state_dict)


def vocab_size_of(vocab_path: Path) -> int:
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{vocab_path}: empty vocab file")
    return len(lines)


def write_tokenizer_files(vocab_path: Path, out: Path, max_len: int) -> None:
    """vocab.txt + tokenizer_config.json; lower-casing inferred from the vocab (uncased vocabs have no capitals)."""
    tokens = vocab_path.read_text(encoding="utf-8").splitlines()
    cased = any(t[:1].isupper() for t in tokens if not (t.startswith("[") and t.endswith("]")))
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": not cased, "model_max_length": max_len}, indent=2))


def convert(source: str, checkpoint: str, config_path: str, vocab_path: str, out_dir: str,
            allow_pickle: bool = False) -> Path:
    config_path, vocab_path = Path(config_path), Path(vocab_path)
    config = BertConfig.from_json_file(str(config_path))
    if getattr(config, "hidden_act", "gelu") in ("bias_gelu", "bias_tanh"):  # NVIDIA's fused-activation names
        config.hidden_act = config.hidden_act.removeprefix("bias_")
    if source == "nvidia":
        state_dict = read_nvidia_checkpoint(Path(checkpoint), allow_pickle)
    elif source == "tf":
        state_dict, skipped = tf_to_hf_state_dict(read_tf_checkpoint(checkpoint))
        log.info("skipped %d optimizer/bookkeeping variables", len(skipped))
    else:
        raise ValueError(f"unknown checkpoint source {source!r}: expected 'nvidia' or 'tf'")

    vocab = vocab_size_of(vocab_path)
    rows = state_dict["bert.embeddings.word_embeddings.weight"].shape[0]
    if rows < vocab:
        raise ValueError(f"{checkpoint}: embedding has {rows} rows but {vocab_path} has {vocab} tokens")
    if config.vocab_size != vocab:
        log.warning("%s says vocab_size %d, %s has %d tokens: using %d", config_path, config.vocab_size, vocab_path,
                    vocab, vocab)
    config.vocab_size = vocab
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
                "cls.predictions.decoder.bias"):
        if key in state_dict:  # padded vocab rows (multiple of 8) -> the tokenizer's size
            state_dict[key] = state_dict[key][:vocab]

    model = BertForPreTraining(config)
    report = load_state_dict_into(model, state_dict, str(checkpoint))
    if report["missing"]:
        log.warning("heads not in the checkpoint were freshly initialised: %s", report["missing"])
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(vocab_path, Path(tok_dir), config.max_position_embeddings)
        return save_pretrained(model, out_dir, tokenizer_dir=tok_dir)


@dataclass(kw_only=True)
class ConvertConfig:
    """NVIDIA or TensorFlow BERT checkpoints -> a HuggingFace model directory."""

    source: str = option(help="the checkpoint's format", choices=("nvidia", "tf"), aliases=["--from"])
    checkpoint: str = option(help="NVIDIA ckpt_N.pt, or the TF checkpoint prefix (model.ckpt-N)", positional=True)
    config: str = option(help="bert_config.json of the checkpoint")
    vocab: str = option(help="vocab.txt the checkpoint was trained with")
    allow_pickle: bool = option(False, "load NVIDIA checkpoints holding non-tensor Python objects (trusted files only)")
    out_dir: str = option(help="the HF model directory to write", positional=True)


def main(cfg: ConvertConfig) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = convert(cfg.source, cfg.checkpoint, cfg.config, cfg.vocab, cfg.out_dir, cfg.allow_pickle)
    print(f"wrote {out}")
    return out


def cli(argv: list[str] | None = None) -> int:
    main(parse(ConvertConfig, argv, prog="biobert convert", description=__doc__, config_file=False))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
