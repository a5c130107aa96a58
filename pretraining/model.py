"""BERT encoder + pretraining heads, parameter-for-parameter compatible with HuggingFace `BertForPreTraining`.

Why our own module instead of transformers' class: three things HF does not do that matter for pretraining speed.
  1. Padding costs nothing: tokens are unpadded to [N_real, H] for embeddings, projections, FFN and LayerNorm; only the
     attention core sees a padded [B, T_max, ...] view, with T_max the longest *real* sequence of the batch.
  2. The MLM head runs only at the masked positions (~15% of tokens) instead of producing [B, T, V] vocab logits.
  3. Attention is torch SDPA (flash / memory-efficient kernels where the platform has them).

Parameter names match HF exactly, so HF checkpoints load and ours are ordinary HF models. Every parameter is used only
inside the forward of the module that owns it: DeepSpeed ZeRO-3 gathers a module's parameters in a forward pre-hook, so
touching `module.weight` from elsewhere would read an empty partition.

Training-only options (read from the BertConfig, stripped from the config.json `save_pretrained` writes):
  pad_vocab_multiple (int, default 1): embedding/decoder rows padded to a multiple (8 for tensor cores); logits and
      checkpoints are sliced back to `vocab_size`, so losses equal the unpadded model's.
  activation_checkpointing (bool, default False): recompute each layer in backward.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.activations import ACT2FN

log = logging.getLogger(__name__)

TRAINING_ONLY_CONFIG_KEYS = ("pad_vocab_multiple", "activation_checkpointing")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def padded_vocab_size(config: BertConfig) -> int:
    multiple = int(getattr(config, "pad_vocab_multiple", 1) or 1)
    return math.ceil(config.vocab_size / multiple) * multiple


class Layout:
    """Where the real tokens of a [B, T] batch live once padding is dropped.

    `index` holds the flat positions (into B*T, T = longest real sequence) of the N real tokens, or None when the batch
    has no padding at all (then everything is a plain reshape and no gather/scatter runs).
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len
        self.index = self.key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            self.index = mask.flatten().nonzero().squeeze(1)
            # A sequence with no real token would give an all-masked softmax row (NaN); let it see its first slot.
            mask[:, 0] |= ~mask.any(1)
            self.key_mask = mask[:, None, None, :]  # [B, 1, 1, T]: True = attend

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]"""
        x = x.reshape(self.batch * self.seq_len, *x.shape[2:])
        return x if self.index is None else x.index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [B, T, D] with zeros at padding."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(self.batch, self.seq_len, x.shape[-1])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Row in the unpadded [N, H] tensor of token (b, positions[b, j]); positions [B, P] -> [B, P]."""
        flat = positions + torch.arange(self.batch, device=positions.device)[:, None] * self.seq_len
        if self.index is None:
            return flat
        lookup = torch.zeros(self.batch * self.seq_len, dtype=torch.long, device=positions.device)
        lookup[self.index] = torch.arange(self.index.numel(), device=positions.device)
        return lookup[flat]


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

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        # Projections run on real tokens only; SDPA needs the rectangular [B, heads, T, head_dim] view.
        B, T, heads = layout.batch, layout.seq_len, self.num_heads
        q, k, v = (layout.pad(proj(x)).view(B, T, heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return layout.unpad(out.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x, layout):
        return self.output(self.self(x, layout), x)


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

    def forward(self, x, layout):
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.activation_checkpointing = bool(getattr(config, "activation_checkpointing", False))

    def forward(self, x, layout):
        for layer in self.layer:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
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

    def encode(self, input_ids, token_type_ids=None, attention_mask=None) -> tuple[torch.Tensor, Layout]:
        """-> (hidden [N_real, H], layout). The batch is first trimmed to its longest real sequence."""
        if attention_mask is not None:
            # Trim to the last column that holds a real token of any sequence (works for any mask, not just right-padding).
            seq_len = int(attention_mask.any(0).nonzero().max()) + 1 if attention_mask.any() else 1
            input_ids, attention_mask = input_ids[:, :seq_len], attention_mask[:, :seq_len]
            token_type_ids = None if token_type_ids is None else token_type_ids[:, :seq_len]
        B, T = input_ids.shape
        layout = Layout(attention_mask, B, T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embeddings(layout.unpad(input_ids), layout.unpad(positions), layout.unpad(token_type_ids))
        return self.encoder(x, layout), layout

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        """-> (sequence_output [B, T, H] (zeros at padding), pooled_output [B, H])."""
        hidden, layout = self.encode(input_ids, token_type_ids, attention_mask)
        sequence = layout.pad(hidden)
        pooled = self.pooler(sequence[:, 0])
        if sequence.shape[1] < input_ids.shape[1]:
            sequence = F.pad(sequence, (0, 0, 0, input_ids.shape[1] - sequence.shape[1]))
        return sequence, pooled


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

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_lm_positions=None,
                masked_lm_ids=None, next_sentence_labels=None, return_logits=False) -> dict:
        hidden, layout = self.bert.encode(input_ids, token_type_ids, attention_mask)
        B = input_ids.shape[0]
        cls_rows = layout.rows(torch.zeros(B, 1, dtype=torch.long, device=input_ids.device))[:, 0]
        pooled = self.bert.pooler(hidden[cls_rows])
        nsp_logits = self.cls.seq_relationship(pooled)
        out = {}
        if masked_lm_positions is not None and masked_lm_ids is not None and next_sentence_labels is not None:
            # Slot j is used iff its position != 0 ([CLS] is never masked). Only used slots reach the vocab projection,
            # the most expensive matmul of a small BERT. The head runs even with zero rows so that every rank calls
            # the same modules (ZeRO-3 gathers parameters in module hooks).
            used = masked_lm_positions != 0
            labels = masked_lm_ids[used]
            logits = self.cls.predictions(hidden[layout.rows(masked_lm_positions)[used]]).float()  # [M, V]
            count = used.sum()
            mlm_loss = F.cross_entropy(logits, labels, reduction="sum") / count.clamp(min=1)
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_labels.view(-1))
            out.update(loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
                       mlm_correct=(logits.argmax(-1) == labels).sum(), mlm_count=count)
        if return_logits:
            logits = self.cls.predictions(layout.pad(hidden))
            out["prediction_logits"] = F.pad(logits, (0, 0, 0, input_ids.shape[1] - logits.shape[1]))
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

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
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
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
