"""Validation during pretraining: MLM loss, perplexity, MLM accuracy and NSP accuracy on the held-out split.

A collective: every rank calls it after the same steps (``EvalConfig.due``, a function of the step number alone). Each
rank runs its share of the fixed subset (pretraining.validation_data: the same number of micro-batches on every rank,
so ZeRO-3's gathers never wait on a rank that has run out) through the engine as training does (packed batches, the
precision plan's autocast), in eval mode without gradients. The per-rank sums -- MLM loss x masked tokens, correct
masked predictions, masked tokens, NSP loss x samples, correct NSP predictions, samples, tokens -- are all-reduced
once and read once, so the figures do not depend on how the subset is cut into batches or ranks (beyond float
summation order). Perplexity = exp(mean MLM loss per masked token).

The figures depend only on the weights and the subset: a resumed run evaluates at step N what the uninterrupted run
did. Evaluation draws no random numbers (no dropout in eval mode; validation masks are fixed), so training after it
continues exactly as it would have without it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from biobert import dist
from data_prep.contract import Manifest
from pretraining.attention import pack
from pretraining.validation_data import subset_size, validation_batches, validation_split

log = logging.getLogger(__name__)

FIELDS = ("loss", "mlm_loss", "nsp_loss", "perplexity", "mlm_acc", "nsp_acc", "samples", "masked_tokens", "tokens")


class Validator:
    """Callable ``validator(engine) -> figures``; build with :meth:`from_config` (None when there is nothing to do)."""

    def __init__(self, base: Path, manifest: Manifest, *, micro_batch_size: int, max_samples: int | None, seed: int,
                 masking: dict, autocast, device: torch.device):
        self.base, self.manifest = Path(base), manifest
        self.micro_batch_size, self.max_samples, self.seed = micro_batch_size, max_samples, seed
        self.masking, self.autocast, self.device = masking, autocast, device
        self.samples = subset_size(manifest, max_samples, dist.world_size())  # raises when the split is too small

    @classmethod
    def from_config(cls, cfg, model_config, tokenizer_dir, plan, device) -> Validator | None:
        """The run's validator, its shards checked like training shards (vocab, and sha256/schema/id ranges when
        data.verify: split across ranks, the findings gathered so every rank raises the same error)."""
        from data_prep.contract import read_vocab_tokens
        from pretraining.data_shards import check_vocab, verify_shards

        if not cfg.eval.enabled:
            return None
        split = validation_split(cfg.data.shard_dir, cfg.data.validation_dir)
        if split is None:
            if dist.rank() == 0:
                log.warning("no validation data: %s has no held-out split (data_prep --validation-fraction) and "
                            "data.validation_dir is not set; the run trains without validation", cfg.data.shard_dir)
            return None
        base, manifest = split
        check_vocab(manifest, tokenizer_dir, model_config.vocab_size)
        if cfg.data.verify:
            mine = verify_shards(base, manifest, range(dist.rank(), len(manifest.shards), dist.world_size()),
                                 vocab_size=model_config.vocab_size)
            errors = [e for part in dist.all_gather_object([str(e) for e in mine]) for e in part]
            if errors:
                raise ValueError(f"validation shard verification failed in {base} (nothing was trained):\n  "
                                 + "\n  ".join(errors))
        vocab = {t: i for i, t in enumerate(read_vocab_tokens(tokenizer_dir))}
        max_predictions = cfg.data.max_predictions
        if manifest.masking != "static" and not max_predictions:  # unmasked held-out shards: the training slots
            from pretraining.data_shards import load_manifest

            max_predictions = load_manifest(cfg.data.shard_dir).max_predictions or None
        masking = dict(masked_lm_prob=cfg.data.masked_lm_prob, max_predictions=max_predictions,
                       vocab_size=model_config.vocab_size, mask_token_id=vocab.get("[MASK]"),
                       special_token_ids=[vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                                          if t in vocab])
        micro = cfg.eval.micro_batch_size or cfg.batch.micro(dist.world_size())
        return cls(base, manifest, micro_batch_size=micro, max_samples=cfg.eval.max_samples, seed=cfg.seed,
                   masking=masking, autocast=plan.autocast, device=device)

    def describe(self) -> str:
        where = self.manifest.settings.get("split") or "validation_dir"
        return (f"{self.samples:,} of {self.manifest.total_samples:,} samples ({where} in {self.base}), "
                f"{self.manifest.masking} masks, micro-batch {self.micro_batch_size} per rank")

    def batches(self):
        """This rank's micro-batches of the subset, packed as the training loader packs them."""
        for b in validation_batches(self.base, self.manifest, micro_batch_size=self.micro_batch_size,
                                    rank=dist.rank(), world_size=dist.world_size(), max_samples=self.max_samples,
                                    seed=self.seed, **self.masking):
            yield pack(b["attention_mask"], b["input_ids"], b["token_type_ids"], b["masked_lm_positions"],
                       b["masked_lm_ids"], b["next_sentence_labels"])

    @torch.no_grad()
    def __call__(self, engine) -> dict:
        """``engine``: the DeepSpeed engine (or a plain BertForPreTraining). Collective: every rank calls it."""
        t0 = time.perf_counter()
        was_training = getattr(engine, "module", engine).training
        engine.eval()
        device_sums, counts = None, [0.0, 0.0, 0.0]  # counts: masked tokens, samples, tokens (known on the host)
        try:
            for packed in self.batches():
                with self.autocast(self.device.type):
                    out = engine(packed=packed.to(self.device))
                # the model's MLM loss is a mean over the batch's masked tokens, its NSP loss over its samples
                values = torch.stack([out["mlm_loss"].double() * packed.masked, out["mlm_correct"].double(),
                                      out["nsp_loss"].double() * packed.batch, out["nsp_correct"].double()])
                device_sums = values if device_sums is None else device_sums + values
                counts = [counts[0] + packed.masked, counts[1] + packed.batch, counts[2] + packed.tokens]
        finally:
            engine.train(was_training)
        totals = torch.cat([device_sums, torch.tensor(counts, dtype=torch.float64, device=device_sums.device)])
        mlm_sum, mlm_correct, nsp_sum, nsp_correct, masked, samples, tokens = (
            dist.all_reduce_sum(totals).cpu().tolist())  # the one collective and the one read of the device
        mlm = mlm_sum / max(masked, 1.0)
        nsp = nsp_sum / max(samples, 1.0)
        return dict(loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp, perplexity=math.exp(min(mlm, 700.0)),
                    mlm_acc=mlm_correct / max(masked, 1.0), nsp_acc=nsp_correct / max(samples, 1.0),
                    samples=int(samples), masked_tokens=int(masked), tokens=int(tokens),
                    seconds=time.perf_counter() - t0)
