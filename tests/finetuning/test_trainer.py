"""The fine-tuning loop's batching, loss weighting and dev selection, with stub models (no BERT, milliseconds)."""

import random

import pytest
import torch
from torch import nn

from finetuning.config import NERConfig
from finetuning.trainer import Runtime, fit, make_batches


class _Recorder(nn.Module):
    """Loss 1 per batch; records (labelled tokens in the batch, the gradient the trainer sends into that loss)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 2))
        self.seen: list[tuple[int, float]] = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        loss = (self.w * 0).sum() + 1.0
        n = int((labels != -100).sum())
        loss.register_hook(lambda g: self.seen.append((n, float(g))))
        return {"loss": loss}


def _features(seed=0, n=64):
    """Sentences of 2..60 tokens; [CLS]/[SEP] unlabelled."""
    rng = random.Random(seed)
    feats = []
    for _ in range(n):
        k = rng.randint(2, 60)
        feats.append({"input_ids": [101] + [1000] * k + [102], "labels": [-100] + [0] * k + [-100]})
    return feats


@pytest.mark.parametrize("bucket", [True, False])
def test_every_labelled_token_weighs_the_same_whatever_its_batch(bucket):
    feats = _features()
    model = _Recorder()
    cfg = NERConfig(data="x", batch_size=8, epochs=2, progress=False, bucket_by_length=bucket, warmup_ratio=0.0)
    fit(model, feats, cfg, Runtime(torch.device("cpu")))
    assert len(model.seen) == 16
    sizes = [n for n, _ in model.seen]
    if bucket:
        assert max(sizes) > 4 * min(sizes)  # bucketed batches differ a lot in labelled tokens...
    per_token = [g / n for n, g in model.seen]
    assert max(per_token) == pytest.approx(min(per_token))  # ...but a token's weight is the same in each
    total = sum(n for f in feats for n in [sum(lab != -100 for lab in f["labels"])])
    assert per_token[0] == pytest.approx(8 / total)  # = 1 / (mean labelled tokens per batch)


def test_bucketed_batches_pad_little_and_change_between_epochs():
    lengths = [random.Random(i).randint(5, 120) for i in range(1400)]
    e1, e2 = (make_batches(lengths, 32, shuffle=True, seed=s, bucket=True) for s in (1, 2))
    assert sorted(i for b in e1 for i in b) == list(range(1400))

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    def co_batched(batches):
        return {(i, j) for b in batches for i in b for j in b if i < j}

    plain = make_batches(lengths, 32, shuffle=True, seed=1, bucket=False)
    assert padding(e1) < padding(plain) / 3
    # Pools of the whole set would give (nearly) the same batches every epoch; pools of 10 batches re-draw them.
    again = len(co_batched(e1) & co_batched(e2)) / len(co_batched(e1))
    assert again < 0.25, again


def test_dev_selection_ties_go_to_the_later_epoch():
    model = _Recorder()
    cfg = NERConfig(data="x", batch_size=8, epochs=3, progress=False)
    scores = iter([0.0, 0.0, 0.0])
    out = fit(model, _features(n=16), cfg, Runtime(torch.device("cpu")), evaluate=lambda m: {"f1": next(scores)})
    assert out["best_epoch"] == 3
    scores = iter([0.2, 0.5, 0.4])
    out = fit(_Recorder(), _features(n=16), cfg, Runtime(torch.device("cpu")), evaluate=lambda m: {"f1": next(scores)})
    assert out["best_epoch"] == 2
