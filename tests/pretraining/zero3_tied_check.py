"""2-rank DeepSpeed ZeRO-3 check of BertForPreTraining: partitioned forward equals the plain model, the decoder stays tied
to the word embeddings, and two steps update the weights exactly like a single process averaging both ranks' gradients;
then the same under DeepSpeed bf16 (half-precision parameters) trains with losses close to fp32.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/pretraining/zero3_tied_check.py OUT.json
(run by tests/pretraining/test_model.py::test_zero3_two_ranks_tied_weights)
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import BertConfig

from biobert.dist import init
from pretraining.model import BertForPreTraining


def make_batch(rank: int, step: int, B=2, T=12, P=3, V=99):
    g = torch.Generator().manual_seed(1000 * step + rank)
    lens = torch.tensor([T, T - 5])
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    ids = torch.randint(5, V, (B, T), generator=g) * mask
    positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:P] + 1 for n in lens])
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask,
                masked_lm_positions=positions, masked_lm_ids=torch.randint(5, V, (B, P), generator=g),
                next_sentence_labels=torch.tensor([0, 1]))


def main(out_path: str) -> None:
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_vocab_multiple=8)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    reference = BertForPreTraining(cfg)
    reference.load_state_dict(model.state_dict())
    ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0
                 "steps_per_print": 10**9}
    # SGD: the update is linear in the gradient, so any lost/doubled tied-weight gradient shows (Adam normalises it away).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    init()  # the project's init (deepspeed.initialize would set up the backend itself, JIT-building the CPU shm op)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    rank = dist.get_rank()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)

    losses, ref_losses = [], []
    for step in range(2):
        out = engine(**make_batch(rank, step))
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
        # Reference: the same two micro-batches on one process, gradients averaged as data parallelism does.
        ref_opt.zero_grad()
        for r in range(2):
            loss = reference(**make_batch(r, step))["loss"]
            (loss / 2).backward()
            if r == rank:
                ref_losses.append(float(loss))
        ref_opt.step()

    module = engine.module
    tied = module.cls.predictions.decoder.weight is module.bert.embeddings.word_embeddings.weight
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        diffs = {n: (p.detach() - reference.get_parameter(n).detach()).abs().max().item() for n, p in params.items()}
        max_diff = max(diffs.values())
        emb_changed = (params["bert.embeddings.word_embeddings.weight"] - model_init_embedding()).abs().max().item()
    # DeepSpeed bf16 (half-precision parameters, no autocast) under ZeRO-3: runs, trains, stays close to fp32.
    torch.manual_seed(0)
    half = BertForPreTraining(cfg)
    half_engine, *_ = deepspeed.initialize(model=half, optimizer=torch.optim.SGD(half.parameters(), lr=0.5),
                                           config={**ds_config, "bf16": {"enabled": True}})
    bf16_losses = []
    for step in range(2):
        out = half_engine(**make_batch(rank, step))
        half_engine.backward(out["loss"])
        half_engine.step()
        bf16_losses.append(out["loss"].item())

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "ref_losses": ref_losses, "tied": tied, "max_param_diff": max_diff,
                       "bf16_losses": bf16_losses,
                       "bf16_param_dtype": str(next(half_engine.module.parameters()).dtype),
                       "embedding_change": emb_changed, "diffs": diffs, "world_size": dist.get_world_size()}, f)


def model_init_embedding() -> torch.Tensor:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, pad_vocab_multiple=8)
    return BertForPreTraining(cfg).bert.embeddings.word_embeddings.weight.detach()


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
