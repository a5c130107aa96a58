"""Continued pretraining from a start without MLM/NSP heads (a BertModel directory such as the packaged MiniLM).

Fresh heads are random: the MLM logits start ~4 nats above the corpus' unigram entropy (MiniLM on MEDLINE: loss 11.2
vs 6.8), and the quickest way for the optimizer to close that gap is to move the *encoder* -- every token's final
state is pushed toward one shared direction that encodes "frequent word" (the step-0 gradient into the encoder is 5x
more common-mode than with a fitted bias). Within 25 steps at lr 1e-4 the last layer's mean token-token cosine went
from 0.09 to 0.71 (CKA to the start 0.36), and a sparse NER task no longer learned anything. Two remedies, both
automatic when the start lacks the heads (docs/continued_pretraining.md has the measurements):

- ``model.mlm_bias_init=prior``: the decoder bias starts at the log unigram frequency of the training shards, so no
  representation has to encode the frequency prior;
- ``model.head_warmup_steps``: the first steps train only the fresh parameters, the loaded ones held still (lr 0).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pretraining.config import HEAD_WARMUP_AUTO, RunConfig

log = logging.getLogger(__name__)

PRIOR_TOKENS = 2_000_000  # tokens read for the unigram prior: a 30k vocab's frequent words are well estimated by then


def fresh_parameters(cfg: RunConfig, model) -> frozenset[str]:
    """Names of the parameters the init checkpoint lacked (empty when training from scratch)."""
    if not cfg.model.init:
        return frozenset()
    params = {name for name, _ in model.named_parameters()}
    return frozenset(k for k in getattr(model, "init_missing_keys", ()) if k in params)


def resolve_head_warmup(cfg: RunConfig, model) -> tuple[int, frozenset[str]]:
    """-> (head warm-up steps, names of the fresh parameters it trains). ``auto``: HEAD_WARMUP_AUTO steps (at most a
    tenth of the schedule) when the init checkpoint lacked some weights, 0 when it had them all or there is no init."""
    fresh = fresh_parameters(cfg, model)
    steps = cfg.model.head_warmup_steps
    if steps == "auto":
        s = cfg.schedule
        steps = max(0, min(HEAD_WARMUP_AUTO, s.total_steps // 10, s.total_steps - s.warmup_steps - 1)) if fresh else 0
    elif steps and not fresh:
        raise ValueError(f"model.head_warmup_steps={steps} but "
                         + (f"{cfg.model.init} has every weight of the model" if cfg.model.init else "there is no init")
                         + ": there are no fresh heads to warm up (use 0 or auto)")
    return steps, (fresh if steps else frozenset())


def unigram_log_prior(shard_dir, vocab_size: int, special_ids=(), max_tokens: int = PRIOR_TOKENS) -> torch.Tensor:
    """log p(token) over the shards' real tokens (add-one smoothed), read from the head of every shard in turn.

    Static-masking shards hold [MASK] where a label was hidden; their masked_lm_ids put the hidden tokens back."""
    from pretraining.data_shards import load_manifest, open_shard

    manifest = load_manifest(shard_dir)
    counts = np.zeros(vocab_size, dtype=np.float64)
    per_shard = max(1, max_tokens // max(1, manifest.seq_len) // len(manifest.shards))
    for info in manifest.shards:
        with open_shard(f"{shard_dir}/{info.file}") as f:
            rows = min(per_shard, f["input_ids"].shape[0])
            ids = f["input_ids"][:rows].astype(np.int64)
            real = f["input_mask"][:rows].astype(bool)
            tokens = [ids[real]]
            if "masked_lm_ids" in f:
                tokens.append(f["masked_lm_ids"][:rows][f["masked_lm_positions"][:rows] != 0].astype(np.int64))
        for t in tokens:
            t = t[(t >= 0) & (t < vocab_size)]
            counts += np.bincount(t, minlength=vocab_size)
    counts[list(special_ids)] = 0  # [CLS]/[SEP]/[MASK]/[PAD] are never labels
    counts += 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def init_mlm_bias(cfg: RunConfig, model, special_ids=()) -> str:
    """Apply model.mlm_bias_init; -> what the bias starts from: "prior", "zero" (fresh, BERT's init) or "loaded"."""
    mode = cfg.model.mlm_bias_init
    fresh = "cls.predictions.bias" in getattr(model, "init_missing_keys", ()) or not cfg.model.init
    if mode == "auto":
        mode = "prior" if cfg.model.init and fresh else "zero"
    if mode == "zero":
        return "zero" if fresh else "loaded"
    if not fresh:
        raise ValueError(f"model.mlm_bias_init=prior but {cfg.model.init} has a trained MLM bias: it would be "
                         "overwritten (use auto)")
    vocab = model.config.vocab_size
    prior = unigram_log_prior(cfg.data.shard_dir, vocab, special_ids)
    with torch.no_grad():
        model.cls.predictions.bias[:vocab].copy_(prior)
    log.warning("MLM decoder bias set to the log unigram prior of %s (the start has no MLM head)", cfg.data.shard_dir)
    return "prior"
