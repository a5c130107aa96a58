"""Export reproduces the trained model: masked-token loss and accuracy of the exported HF directory, through
transformers' own BertForPreTraining, equal the live engine's on the same held-out batch. MiniLM continued with the
recipe for a start without heads (log-prior MLM bias, head warm-up), ZeRO-2, one rank."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


def test_exported_minilm_scores_like_the_engine(tmp_path, tmp_path_factory, shared_data, minilm_dir):
    from transformers import BertForPreTraining as HFBertForPreTraining

    from pretraining.data_shards import open_shard
    from pretraining.export import export
    from pretraining.trainer import main

    shards = ef.corpus_shards(tmp_path_factory.getbasetemp(), shared_data, minilm_dir)  # dynamic masking
    torch.set_num_threads(1)
    run = ef.tiny_run(tmp_path / "run", shards, None, max_steps=3, model={"init": "minilm", "tokenizer": None,
                                                                           "head_warmup_steps": 1})
    result = main(ef.load_tiny(run, ["ds.train_batch_size=2", "optimizer.lr=1e-4"]))
    assert result["summary"]["mlm_bias_init"] == "prior" and result["summary"]["head_warmup_steps"] == 1
    engine = result["engine"]

    # held out: rows the 6 trained samples never touched, masked here with a fixed rng (BERT's 80/10/10 not needed:
    # equality is the point, every position is a [MASK])
    with open_shard(shards / "shard-00003-of-00004.hdf5") as f:
        ids = torch.from_numpy(f["input_ids"][500:508].astype(np.int64))
        real = torch.from_numpy(f["input_mask"][500:508].astype(np.int64))
        types = torch.from_numpy(f["segment_ids"][500:508].astype(np.int64))
    rng = np.random.default_rng(0)
    positions = torch.zeros(8, 12, dtype=torch.long)
    for b in range(8):
        n = int(real[b].sum())
        positions[b] = torch.from_numpy(np.sort(rng.choice(np.arange(1, n - 1), 12, replace=False)))
    labels = ids.gather(1, positions)
    masked = ids.scatter(1, positions, 103)  # [MASK]
    batch = dict(input_ids=masked, token_type_ids=types, attention_mask=real, masked_lm_positions=positions,
                 masked_lm_ids=labels, next_sentence_labels=torch.zeros(8, dtype=torch.long))
    engine.eval()
    with torch.no_grad():
        ours = engine(**batch)
    hf = HFBertForPreTraining.from_pretrained(export(tmp_path / "run" / "checkpoints", tmp_path / "hf")).eval()
    with torch.no_grad():
        logits = hf(input_ids=masked, token_type_ids=types, attention_mask=real).prediction_logits
    picked = logits[torch.arange(8)[:, None], positions].reshape(-1, logits.shape[-1])
    hf_loss = F.cross_entropy(picked, labels.reshape(-1))
    hf_correct = int((picked.argmax(-1) == labels.reshape(-1)).sum())
    assert abs(float(ours["mlm_loss"]) - float(hf_loss)) < 1e-4, (float(ours["mlm_loss"]), float(hf_loss))
    assert int(ours["mlm_correct"]) == hf_correct and int(ours["mlm_count"]) == 96
    assert float(hf_loss) < 9.0  # the prior-initialised head is already far below uniform (10.3)
