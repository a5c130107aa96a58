"""BERT encoder + pretraining heads, parameter-for-parameter compatible with HuggingFace `BertForPreTraining`.

Why our own module instead of transformers' class: what HF does not do that matters for pretraining speed.
  1. Padding costs nothing: the batch arrives packed (pretraining.attention.Packed, built by the loader thread on CPU)
     and every layer runs on the N real tokens, attention included (flash varlen over cu_seqlens on CUDA; a padded SDPA
     fallback elsewhere). No index is computed and nothing is read back on the GPU: a step has no host sync.
  2. The MLM head runs only at the masked positions (~15% of tokens) instead of producing [B, T, V] vocab logits.
  3. Q, K and V come from one GEMM over the concatenated weights (the three Parameters stay separate, so HF names,
     checkpoints and LAMB's per-tensor trust ratios are unchanged).
  4. `compile_layers()` puts the encoder layers through torch.compile (dynamic shapes: N varies per batch).

Parameter names match HF exactly, so HF checkpoints load and ours are ordinary HF models. Every parameter is used only
inside the forward of the module that owns it or its parent: DeepSpeed ZeRO-3 gathers a module's parameters in a
forward pre-hook, so the fused QKV GEMM (which reads the query/key/value Linears' weights from their parent) falls back
to three GEMMs when the parameters are ZeRO-3 partitioned.

Training-only options (read from the BertConfig, stripped from the config.json `save_pretrained` writes):
  pad_vocab_multiple (int, default 1): embedding/decoder rows padded to a multiple (8 for tensor cores); logits and
      checkpoints are sliced back to `vocab_size`, so losses equal the unpadded model's.
  activation_checkpointing (bool, default False): recompute each layer in backward.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.activations import ACT2FN

from biobert.files import publish_dir, temp_dir_for
from pretraining import attention as _attention
from pretraining.attention import Packed, attend, pack

log = logging.getLogger(__name__)

TRAINING_ONLY_CONFIG_KEYS = ("pad_vocab_multiple", "activation_checkpointing")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def padded_vocab_size(config: BertConfig) -> int:
    multiple = int(getattr(config, "pad_vocab_multiple", 1) or 1)
    return math.ceil(config.vocab_size / multiple) * multiple


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab_size(config), config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        if hasattr(self.query.weight, "ds_status"):  # ZeRO-3: each Linear gathers its weights in its own hook
            qkv = torch.cat([self.query(x), self.key(x), self.value(x)], -1)
        else:  # one GEMM; concatenating the weights costs ~1% of it
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            qkv = F.linear(x, weight, bias)
        return attend(qkv, packed, self.num_heads, self.dropout_p if self.training else 0.0)


class DenseResidualNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput (post-LN): LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = DenseResidualNorm(config.hidden_size, config)

    def forward(self, x, packed):
        return self.output(self.self(x, packed), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = DenseResidualNorm(config.intermediate_size, config)

    def forward(self, x, packed):
        x = self.attention(x, packed)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.activation_checkpointing = bool(getattr(config, "activation_checkpointing", False))

    def forward(self, x, packed):
        for layer in self.layer:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, packed, use_reentrant=False)
            else:
                x = layer(x, packed)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token):
        """first_token: [B, H], the hidden state of [CLS]."""
        return torch.tanh(self.dense(first_token))


class BertModel(nn.Module):
    """The encoder (HF `BertModel` names). Fine-tuning heads wrap it as `.bert`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute" or config.is_decoder:
            raise ValueError("only encoder BERT with absolute position embeddings is supported")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(lambda m: init_weights(m, config))

    def encode(self, packed: Packed) -> torch.Tensor:
        """-> hidden states of the real tokens, [N, H] (rows as in `packed`)."""
        x = self.embeddings(packed.input_ids, packed.position_ids, packed.token_type_ids)
        return self.encoder(x, packed)

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, packed: Packed | None = None):
        """-> (sequence_output [B, T, H] (zeros at padding), pooled_output [B, H]). Give a mask (HF style; the layout
        is then built on the device, with host syncs) or a `packed` batch."""
        if packed is None:
            packed = pack(attention_mask, input_ids, token_type_ids)
        hidden = self.encode(packed)
        B, T = packed.batch, packed.seq_len
        sequence = hidden.new_zeros(B * T, hidden.shape[-1]).index_copy(0, packed.token_index, hidden)
        pooled = self.pooler(hidden.index_select(0, packed.cls_rows))
        return sequence.view(B, T, -1), pooled

    def attention_path(self, device: torch.device, dtype: torch.dtype) -> str:
        """The attention implementation a training forward runs with activations of `dtype` on `device`."""
        return _attention.attention_path(device, dtype,
                                         self.config.attention_probs_dropout_prob if self.training else 0.0)

    def compile_layers(self, **options) -> None:
        """torch.compile each encoder layer (one graph for all of them; dynamic: N and max_seqlen vary per batch)."""
        for layer in self.encoder.layer:
            layer.compile(**{"dynamic": True, **options})


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.transform = BertPredictionHeadTransform(config)
        # decoder.weight is replaced by the word-embedding Parameter (tied) in BertForPreTraining.
        self.decoder = nn.Linear(config.hidden_size, padded_vocab_size(config), bias=False)
        self.bias = nn.Parameter(torch.zeros(padded_vocab_size(config)))

    def forward(self, x):
        """x [..., H] -> logits [..., vocab_size] (padded vocab rows sliced off, so they never enter a softmax)."""
        return (self.decoder(self.transform(x)) + self.bias)[..., : self.vocab_size]


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(nn.Module):
    """BERT with MLM + NSP heads (HF `BertForPreTraining` names); the MLM head runs only at masked positions."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.cls.apply(lambda m: init_weights(m, config))
        self.tie_weights()

    def tie_weights(self):
        # One shared Parameter: optimizers, DDP and ZeRO (which dedups by identity) see a single tensor.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, masked_lm_positions=None,
                masked_lm_ids=None, next_sentence_labels=None, return_logits=False, packed: Packed | None = None) -> dict:
        """Either HF-style tensors ([B, T] ids and mask, [B, P] masked positions/ids, [B] NSP labels) or a `packed`
        batch from the loader (no host sync anywhere in forward or backward)."""
        if packed is None:
            packed = pack(attention_mask, input_ids, token_type_ids, masked_lm_positions, masked_lm_ids,
                          next_sentence_labels)
        hidden = self.bert.encode(packed)
        pooled = self.bert.pooler(hidden.index_select(0, packed.cls_rows))
        nsp_logits = self.cls.seq_relationship(pooled)
        out = {}
        if packed.mlm_rows is not None and packed.nsp_labels is not None:
            # Only the used slots reach the vocab projection, the most expensive matmul of a small BERT. The head runs
            # even with zero rows so that every rank calls the same modules (ZeRO-3 gathers parameters in module hooks).
            labels = packed.mlm_labels
            logits = self.cls.predictions(hidden.index_select(0, packed.mlm_rows)).float()  # [M, V]
            mlm_loss = F.cross_entropy(logits, labels, reduction="sum") / max(packed.masked, 1)
            nsp_loss = F.cross_entropy(nsp_logits.float(), packed.nsp_labels)
            out.update(loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
                       mlm_correct=(logits.argmax(-1) == labels).sum(), mlm_count=packed.masked,
                       nsp_correct=(nsp_logits.argmax(-1) == packed.nsp_labels).sum())
        if return_logits:
            B, T = packed.batch, packed.seq_len
            logits = self.cls.predictions(hidden)
            padded = logits.new_zeros(B * T, logits.shape[-1]).index_copy(0, packed.token_index, logits)
            out["prediction_logits"] = padded.view(B, T, -1)
            out["seq_relationship_logits"] = nsp_logits
        return out


def init_weights(module: nn.Module, config: BertConfig) -> None:
    """BERT init: weights ~ N(0, initializer_range), biases 0, LayerNorm 1/0, padding embedding row 0."""
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, BertLMPredictionHead):
        nn.init.zeros_(module.bias)


def training_flops_per_sequence(config: BertConfig, seq_len: int, masked_positions: int | None = None) -> float:
    """Model FLOPs to train on one sequence (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

      encoder:   6 * P_layer * L * T            P_layer = 4(H^2 + H) + 2*H*FF + FF + H + 4H  (QKVO, FFN, 2 LayerNorms)
      attention: 12 * L * H * T^2               (QK^T and AV: 2 * 2*T^2*H forward per layer, x3)
      MLM head:  6 * M * (H^2 + 3H + H*V + V)   at the M masked positions (default M = round(0.15 * T))
      NSP:       6 * (H^2 + H + 2H + 2)         pooler + classifier, once per sequence
    FF = intermediate_size. Embedding lookups cost no matmul FLOPs and are left out. V is the real (unpadded) vocab size.
    """
    H, FF, L, V, T = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size, seq_len)
    M = round(0.15 * T) if masked_positions is None else masked_positions
    layer_params = 4 * (H * H + H) + 2 * H * FF + FF + H + 4 * H
    return float(6 * layer_params * L * T + 12 * L * H * T * T + 6 * M * (H * H + 3 * H + H * V + V)
                 + 6 * (H * H + 3 * H + 2))


# ----------------------------------------------------------------------------------------------------------------------
# HF directory I/O


def _read_weights(model_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = model_dir / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path)), path
            return torch.load(path, map_location="cpu", weights_only=True), path
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not "
                            f"supported; re-save as one file)")


def _normalise_keys(state_dict: dict[str, torch.Tensor], has_bert_attr: bool) -> dict[str, torch.Tensor]:
    """Map HF / DeepSpeed / old-TF-style names onto ours; drop buffers and the tied decoder copies."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue
        encoder_key = key.removeprefix("bert.")
        if encoder_key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = ("bert." if has_bert_attr else "") + encoder_key
        elif not has_bert_attr and key.startswith("cls."):
            continue  # pretraining heads are not part of a bare encoder
        out[key] = value
    if "cls.predictions.decoder.bias" in out:
        out.setdefault("cls.predictions.bias", out["cls.predictions.decoder.bias"])
        del out["cls.predictions.decoder.bias"]
    out.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
    return out


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Load an HF-style state dict (any prefix convention) into our model; pads a smaller vocab up to a padded
    embedding. Raises on shape mismatches and on missing encoder weights; returns {'missing', 'unexpected'}."""
    has_bert = hasattr(model, "bert")
    state_dict = _normalise_keys(state_dict, has_bert)
    own = model.state_dict()
    errors = []
    for key, value in list(state_dict.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        target = own[key]
        is_vocab = key.endswith(("word_embeddings.weight", "cls.predictions.bias"))
        if is_vocab and value.shape[0] < target.shape[0] and value.shape[1:] == target.shape[1:]:
            padded = target.detach().clone()  # keep the freshly initialised padding rows
            padded[: value.shape[0]] = value
            state_dict[key] = padded
        else:
            errors.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    if errors:
        more = f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else ""
        raise ValueError(f"{source}: {len(errors)} shape mismatches (wrong config.json?):\n  " + "\n  ".join(errors[:8])
                         + more)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k != "cls.predictions.decoder.weight"]
    encoder_prefix = "bert." if has_bert else ""
    missing_encoder = [k for k in missing if k.startswith((encoder_prefix + "embeddings.", encoder_prefix + "encoder."))]
    if missing_encoder:
        raise ValueError(f"{source}: encoder weights missing from the checkpoint: {missing_encoder[:10]}"
                         f"{' ...' if len(missing_encoder) > 10 else ''}")
    if missing:
        log.warning("%s: %d weights not in the checkpoint, freshly initialised: %s", source, len(missing), missing)
    if result.unexpected_keys:
        log.warning("%s: %d checkpoint weights unused by %s: %s", source, len(result.unexpected_keys),
                    type(model).__name__, result.unexpected_keys)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return {"missing": missing, "unexpected": list(result.unexpected_keys)}


def load_pretrained(model_dir, model_cls=BertForPreTraining, **config_overrides) -> nn.Module:
    """Build `model_cls(config)` from an HF directory (config.json + model.safetensors | pytorch_model.bin).

    Accepts BertModel-only dirs (heads freshly initialised, decoder tied) and full BertForPreTraining dirs, and works for
    any module whose encoder is `.bert` (fine-tuning heads). Returned in eval mode, like HF's from_pretrained.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected an HF BERT model directory)")
    config = BertConfig.from_json_file(str(model_dir / "config.json"))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = model_cls(config)
    state_dict, path = _read_weights(model_dir)
    # what the directory lacked (freshly initialised): pretraining warms these heads up before touching the rest
    model.init_missing_keys = tuple(load_state_dict_into(model, state_dict, str(path))["missing"])
    return model.eval()


def _hf_architecture(model: nn.Module) -> str:
    return getattr(model, "hf_architecture", None) or type(model).__name__


def save_pretrained(model: nn.Module, out_dir, tokenizer_dir=None, state_dict=None) -> Path:
    """Write an ordinary HF directory (model.safetensors, config.json, tokenizer files) atomically.

    `state_dict` overrides the model's own tensors (e.g. fp32 weights consolidated from a ZeRO checkpoint).
    A padded vocab is sliced back to config.vocab_size; tied copies are stored once, as HF does.
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # DeepSpeed / DDP wrappers
    config = model.config
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")) or key in (
                "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue
        if value.data_ptr() in seen and value.numel() > 0:
            continue  # another tied alias
        seen.add(value.data_ptr())
        if key.endswith(("word_embeddings.weight", "cls.predictions.bias")):
            value = value[: config.vocab_size]
        tensors[key] = value.detach().to("cpu").contiguous().clone()

    tmp = temp_dir_for(out_dir)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config_dict = config.to_dict()
        for key in TRAINING_ONLY_CONFIG_KEYS:
            config_dict.pop(key, None)
        config_dict["architectures"] = [_hf_architecture(model)]
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            copied = [n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
            if "vocab.txt" not in copied and "tokenizer.json" not in copied:
                raise FileNotFoundError(f"{tokenizer_dir}: no vocab.txt or tokenizer.json to copy")
            for name in copied:
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        return publish_dir(tmp, out_dir)  # readable by others (0644/0755), swapped in whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
