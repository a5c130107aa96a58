"""Loader throughput (samples/s per process) vs a plain h5py+numpy reader, measured side by side in one run.

    biobert bench loader [--shard-dir DIR --vocab VOCAB] [--seq-lens 128 512] [--micro-batch 64]
                                           [--seconds 5] [--world-size W] [--json OUT.json]

Without --shard-dir it writes synthetic shards of realistic size (static and dynamic-masking variants) to a temp dir.
The baseline reads each batch straight from the file (h5py slices, in file order, no shuffling) and converts it to
torch.long; for dynamic shards it masks like HF's DataCollatorForLanguageModeling (torch bernoulli 15%, 80/10/10).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.synthetic import MASK_ID, SPECIAL_IDS, write_synthetic_shards
from biobert.config import option, parse
from biobert.files import atomic_write_json
from data_prep.contract import read_vocab_tokens
from pretraining.data import PretrainingLoader
from pretraining.data_shards import load_manifest

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(kw_only=True)
class LoaderBenchConfig:
    """Loader throughput vs a plain h5py reader."""

    shard_dir: str | None = option(None, "existing shards (measured as they are); default: synthetic shards")
    seq_lens: list[int] = option(factory=lambda: [128, 512], help="synthetic shards: sequence lengths")
    maskings: list[str] = option(factory=lambda: ["static", "dynamic"], help="synthetic shards: masking variants",
                                 choices=("static", "dynamic"))
    micro_batch: int = option(64, "samples per batch")
    seconds: float = option(5.0, "per measurement (after the first batch)")
    num_shards: int = option(3, "synthetic shards per variant")
    samples_per_shard: int = option(32768, "synthetic samples per shard")
    world_size: int = option(1, "measure rank 0 of this many ranks (each keeps its 1/world share)")
    vocab: str | None = option(None, "vocab.txt / tokenizer dir of --shard-dir's dynamic shards ([MASK], special ids)")
    vocab_size: int = option(30522, "synthetic shards: vocabulary size")
    work_dir: str | None = option(None, "where synthetic shards go (default: a temp dir)")
    json: str | None = option(None, "also write the results here")

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.seconds <= 0 or self.world_size < 1:
            raise ValueError("micro_batch and world_size must be >= 1 and seconds > 0")


def _timed(batches, micro_batch: int, seconds: float) -> float:
    """samples/s over `seconds`, starting after the first batch (so the first shard read counts only once)."""
    next(batches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(batches)
        n += micro_batch
    return n / (time.perf_counter() - t0)


def measure_loader(shard_dir, micro_batch: int, seconds: float, world_size: int = 1, **kw) -> float:
    with PretrainingLoader(shard_dir, micro_batch_size=micro_batch, grad_accum_steps=1, rank=0, world_size=world_size,
                           seed=0, prefetch=4, **kw) as loader:
        return _timed(iter(loader), micro_batch, seconds)


def _hf_style_mask(ids: torch.Tensor, attention: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    special = (ids < len(SPECIAL_IDS)) | (attention == 0)
    prob = torch.full(ids.shape, 0.15).masked_fill_(special, 0.0)
    chosen = torch.bernoulli(prob).bool()
    labels = torch.where(chosen, ids, -100)
    ids = ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & chosen
    ids[to_mask] = MASK_ID
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & chosen & ~to_mask
    ids[to_random] = torch.randint(vocab_size, ids.shape)[to_random]
    return ids, labels


def baseline_batches(shard_dir, micro_batch: int, vocab_size: int):
    """Plain reader: h5py slices batch by batch, in file order, epochs forever."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    names = ["input_ids", "input_mask", "segment_ids", "next_sentence_labels"]
    if manifest.masking == "static":
        names += ["masked_lm_positions", "masked_lm_ids"]
    while True:
        for info in manifest.shards:
            with h5py.File(shard_dir / info.file, "r") as f:
                ds = [f[name] for name in names]
                for i in range(0, info.samples - micro_batch + 1, micro_batch):
                    batch = {name: torch.from_numpy(d[i:i + micro_batch].astype(np.int64)) for name, d in zip(names, ds)}
                    if manifest.masking == "dynamic":
                        batch["input_ids"], batch["labels"] = _hf_style_mask(
                            batch["input_ids"], batch["input_mask"], vocab_size)
                    yield batch


def main(cfg: LoaderBenchConfig) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(dir=cfg.work_dir) as tmp:
        cases = []
        if cfg.shard_dir:
            m = load_manifest(cfg.shard_dir)
            cases.append((m.seq_len, m.masking, Path(cfg.shard_dir)))
        else:
            for seq_len in cfg.seq_lens:
                for masking in cfg.maskings:
                    d = Path(tmp) / f"{masking}-{seq_len}"
                    write_synthetic_shards(d, num_shards=cfg.num_shards, samples_per_shard=cfg.samples_per_shard,
                                           seq_len=seq_len, max_predictions=max(20, round(seq_len * 0.15)),
                                           masking=masking, vocab_size=cfg.vocab_size)
                    cases.append((seq_len, masking, d))
        tokens = {}
        if cfg.vocab:
            tokens = {t: i for i, t in enumerate(read_vocab_tokens(cfg.vocab))}
        special = dict(special_token_ids=[tokens[t] for t in SPECIAL_TOKENS if t in tokens],
                       mask_token_id=tokens.get("[MASK]")) if tokens else {}
        for seq_len, masking, d in cases:
            ours = measure_loader(d, cfg.micro_batch, cfg.seconds, cfg.world_size, **special)
            base = _timed(baseline_batches(d, cfg.micro_batch, cfg.vocab_size), cfg.micro_batch, cfg.seconds)
            mb = sum((d / s.file).stat().st_size for s in load_manifest(d).shards) / 2**20
            row = dict(seq_len=seq_len, masking=masking, micro_batch=cfg.micro_batch, world_size=cfg.world_size,
                       shard_mb=round(mb, 1),
                       loader_samples_per_s=round(ours), baseline_samples_per_s=round(base), speedup=round(ours / base, 2))
            results.append(row)
            print(f"seq {seq_len:4d} {masking:8s} loader {ours:10,.0f} samples/s   h5py+numpy baseline {base:10,.0f} "
                  f"samples/s   x{ours / base:.2f}   ({mb:.0f} MB of shards, micro-batch {cfg.micro_batch}, rank 0 of "
                  f"{cfg.world_size})", flush=True)
    return results


def cli(argv: list[str] | None = None) -> int:
    cfg = parse(LoaderBenchConfig, argv, prog="biobert bench loader", description=__doc__)
    torch.set_num_threads(1)  # one process = one trainer's loader; keep torch from spreading over all cores
    res = main(cfg)
    if cfg.json:
        atomic_write_json(cfg.json, {"config": asdict(cfg), "results": res})
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(cli())
