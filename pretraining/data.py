"""PretrainingLoader: HDF5 shards -> micro-batches, deterministic, resumable to the sample, prefetched in the background.

Order. Epoch e visits the shards in a permutation keyed by (seed, e) and each shard's samples in a permutation keyed
by (seed, e, shard) (masking.permutation: integer hashing, independent of numpy's RNG streams), so I/O is shard-local: a rank reads one whole shard at a time. The resulting global sample
sequence (epochs back to back) is cut into rounds of micro_batch_size * world_size samples; in round m, rank r takes
samples [m*W*B + r*B, m*W*B + (r+1)*B). A global batch is grad_accum_steps consecutive rounds. The position is therefore
one number, samples consumed, independent of world size: resuming = constructing with start_sample=samples_consumed.

Threads. One thread reads the next shard (each dataset whole, one sequential read; dynamic shards are masked here)
while another gathers the current one's rows into micro-batches of torch tensors for a bounded queue of `prefetch`
micro-batches. At most two shards are held (the one being batched and the one read ahead). Errors in either thread
are re-raised in the consumer as ShardError naming the shard.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.contract import Manifest
from pretraining.attention import pack
from pretraining.data_shards import ShardProblem, check_vocab, load_manifest, open_shard, schema_problems, verify_shards
from pretraining.masking import mask_batch, permutation

__all__ = ["PretrainingLoader", "ShardError", "ShardProblem", "check_vocab", "verify_shards", "rank_schedule"]

# shard dataset -> batch key (HF names at the boundary)
BATCH_KEYS = {
    "input_ids": "input_ids",
    "segment_ids": "token_type_ids",
    "input_mask": "attention_mask",
    "masked_lm_positions": "masked_lm_positions",
    "masked_lm_ids": "masked_lm_ids",
    "next_sentence_labels": "next_sentence_labels",
    "sample_ids": "sample_ids",
}
_POLL_S = 0.1  # how often blocked threads look at the stop flag
_MASK_CHUNK = 4096  # rows masked at once: bounds the temporaries of dynamic masking


class ShardError(RuntimeError):
    """A failure while reading or preparing a shard in the loader's background thread; `.shard` is its path."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"{shard}: {message}")
        self.shard = shard


@dataclass(frozen=True)
class ShardJob:
    """This rank's share of one shard visit: which rows of the shard, in consumption order."""

    index: int  # index into manifest.shards
    file: str
    epoch: int
    rows: np.ndarray  # int64 row numbers within the shard


def rank_schedule(
    sizes: list[int], seed: int, start_sample: int, micro_batch_size: int, world_size: int, rank: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (epoch, position in `sizes`, rows) for every shard visit that gives this rank samples, forever.

    Pure function of its arguments (no files), so the order can be reasoned about and tested on its own.
    """
    total = sum(sizes)
    epoch = start_sample // total
    while True:
        shard_order = permutation(len(sizes), seed, epoch)
        base = epoch * total
        for k in shard_order:
            n = sizes[k]
            lo, hi = base, base + n
            base = hi
            if hi <= start_sample:
                continue
            positions = np.arange(max(lo, start_sample), hi, dtype=np.int64)
            mine = positions[(positions // micro_batch_size) % world_size == rank]
            if mine.size:
                within = permutation(n, seed, epoch, int(k))
                yield epoch, int(k), within[mine - lo]
        epoch += 1


class PretrainingLoader:
    """Iterate micro-batches (dicts of torch.long tensors) forever; see the module docstring for the order.

    With ``pack=True`` each batch also carries ``"packed"``: the unpadded layout (pretraining.attention.Packed: real
    tokens, cu_seqlens, max_seqlen, masked-LM rows) built in the background thread, pinned when ``pin_memory`` and CUDA
    are on, for a training step that copies it with non_blocking=True and never reads anything back.
    """

    def __init__(
        self,
        shard_dir,
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        start_sample: int = 0,
        masked_lm_prob: float = 0.15,
        max_predictions: int | None = None,
        vocab_size: int | None = None,
        special_token_ids: Iterable[int] = (),
        mask_token_id: int | None = None,
        prefetch: int = 2,
        skip_bad_shards: bool = False,
        exclude_shards: Iterable[str] = (),
        pin_memory: bool = False,
        pack: bool = False,
    ):
        if micro_batch_size < 1 or grad_accum_steps < 1 or world_size < 1 or prefetch < 1:
            raise ValueError("micro_batch_size, grad_accum_steps, world_size and prefetch must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        round_size = micro_batch_size * world_size
        if start_sample < 0 or start_sample % round_size:
            raise ValueError(
                f"start_sample {start_sample} is not a multiple of micro_batch_size * world_size = {round_size}: "
                "resume from a samples-consumed count saved at a step boundary (steps * global batch)"
            )
        self.shard_dir = Path(shard_dir)
        self.manifest: Manifest = load_manifest(self.shard_dir)
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_sample = start_sample
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.prefetch, self.pin_memory, self.pack = prefetch, pin_memory, pack
        self.masking = self.manifest.masking
        self.seq_len = self.manifest.seq_len

        # Global ids are offsets in manifest order over ALL shards, so they stay stable when shards are skipped.
        first_ids = np.concatenate([[0], np.cumsum([s.samples for s in self.manifest.shards])])[:-1].astype(np.int64)
        self.skipped_shards: dict[str, str] = {}
        excluded = {Path(f).name for f in exclude_shards}
        problems: list[ShardProblem] = []
        for i, info in enumerate(self.manifest.shards):
            if Path(info.file).name in excluded:
                self.skipped_shards[info.file] = "excluded (failed verification)"
                continue
            found = schema_problems(self.shard_dir, self.manifest, i)
            problems += found
            if found:
                self.skipped_shards[info.file] = "; ".join(found)
        if problems and not skip_bad_shards:
            raise ValueError("bad shards (pass skip_bad_shards=True to leave them out):\n  " + "\n  ".join(problems))
        used = [i for i, s in enumerate(self.manifest.shards) if s.file not in self.skipped_shards and s.samples]
        self.num_samples = int(sum(self.manifest.shards[i].samples for i in used))
        if self.num_samples == 0:
            raise ValueError(f"{self.shard_dir}: no samples in any usable shard")

        mask_args = None
        self.vocab_size = vocab_size or self.manifest.vocab_size  # 0 when unknown (NVIDIA shards)
        if self.masking == "static":
            self.max_predictions = self.manifest.max_predictions
            if max_predictions is not None and max_predictions != self.max_predictions:
                raise ValueError(
                    f"{self.shard_dir}: static shards hold {self.max_predictions} prediction slots, "
                    f"max_predictions={max_predictions} requested; make shards with that setting or drop it"
                )
        else:
            settings = self.manifest.settings
            self.max_predictions = max_predictions or self.manifest.max_predictions
            mask_token_id = settings.get("mask_token_id") if mask_token_id is None else mask_token_id
            if not self.max_predictions or not self.vocab_size or mask_token_id is None:
                raise ValueError(
                    f"{self.shard_dir}: dynamic-masking shards need max_predictions, vocab_size and mask_token_id "
                    "(from the tokenizer) when the manifest does not give them"
                )
            mask_args = dict(
                seed=seed, masked_lm_prob=masked_lm_prob, max_predictions=self.max_predictions,
                vocab_size=self.vocab_size, mask_token_id=int(mask_token_id),
                special_token_ids=tuple(int(t) for t in (special_token_ids or settings.get("special_token_ids", ()))),
            )
        self._reader = _ShardReader(self.shard_dir, self.manifest, used, first_ids, seed, start_sample,
                                    micro_batch_size, world_size, rank, mask_args)
        self._pipeline: _Pipeline | None = None
        self._rounds = 0

    @property
    def samples_consumed(self) -> int:
        """Global position after every rank consumed as many micro-batches as this one (ranks step in lockstep)."""
        return self.start_sample + self._rounds * self.micro_batch_size * self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._pipeline is not None:
            raise RuntimeError("PretrainingLoader is iterated once; build a new one (start_sample=...) to restart")
        self._pipeline = _Pipeline(self._reader, self.prefetch, self.pin_memory, self.pack)
        weakref.finalize(self, self._pipeline.close)
        return self._batches(self._pipeline)

    def _batches(self, pipeline: _Pipeline) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            item = pipeline.get()
            if item is None:  # closed
                return
            if isinstance(item, ShardError):
                pipeline.close()
                raise item
            self._rounds += 1
            yield item

    def close(self) -> None:
        """Stop the background threads and free their buffers (also done on garbage collection)."""
        if self._pipeline is not None:
            self._pipeline.close()

    def __enter__(self) -> PretrainingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _ShardReader:
    """Everything the background threads need, and nothing that references the loader (so it can be collected)."""

    shard_dir: Path
    manifest: Manifest
    used: list[int]  # indices into manifest.shards still in play
    first_ids: np.ndarray  # global id of each shard's row 0
    seed: int
    start_sample: int
    micro: int
    world: int
    rank: int
    mask_args: dict | None  # None: static shards

    def jobs(self) -> Iterator[ShardJob]:
        sizes = [self.manifest.shards[i].samples for i in self.used]
        for epoch, k, rows in rank_schedule(sizes, self.seed, self.start_sample, self.micro, self.world, self.rank):
            i = self.used[k]
            yield ShardJob(i, self.manifest.shards[i].file, epoch, rows)

    def load(self, job: ShardJob) -> ShardRows:
        """One shard, read whole (one sequential read per dataset), with this rank's rows in order; dynamic shards are
        masked here, a chunk at a time, so only the masked input_ids are gathered ahead of the batches."""
        info = self.manifest.shards[job.index]
        names = ["input_ids", "input_mask", "segment_ids", "next_sentence_labels"]
        if self.mask_args is None:
            names += ["masked_lm_positions", "masked_lm_ids"]
        full = {}
        with open_shard(self.shard_dir / info.file) as f:
            for name in names:
                ds = f[name]
                if ds.shape[0] != info.samples:
                    raise ValueError(f"dataset {name!r} has {ds.shape[0]} rows, manifest says {info.samples}")
                full[name] = ds[()]
        sample_ids = self.first_ids[job.index] + job.rows
        gathered = {"sample_ids": sample_ids}
        if self.mask_args is not None:
            n, p = len(job.rows), self.mask_args["max_predictions"]
            ids = np.empty((n, self.manifest.seq_len), np.int32)
            positions, lm_ids = np.empty((n, p), np.int32), np.empty((n, p), np.int32)
            for a in range(0, n, _MASK_CHUNK):
                rows = job.rows[a:a + _MASK_CHUNK]
                ids[a:a + len(rows)], positions[a:a + len(rows)], lm_ids[a:a + len(rows)] = mask_batch(
                    full["input_ids"][rows], full["input_mask"][rows], full["segment_ids"][rows],
                    sample_ids[a:a + len(rows)], epoch=job.epoch, **self.mask_args,
                )
            del full["input_ids"]
            gathered.update(input_ids=ids, masked_lm_positions=positions, masked_lm_ids=lm_ids)
        rows = job.rows
        if 2 * len(rows) < info.samples:  # several ranks: keep only our share in memory
            full = {k: v[rows] for k, v in full.items()}
            rows = np.arange(len(rows))
        return ShardRows(rows, full, gathered)


@dataclass
class ShardRows:
    """A shard in memory: `full` datasets indexed by `rows`, `gathered` ones already in row order (aligned with rows).

    Batches gather their rows from `full` themselves: a small gather straight into the batch is cheaper than
    permuting the whole shard first (one fewer pass over memory).
    """

    rows: np.ndarray
    full: dict[str, np.ndarray]
    gathered: dict[str, np.ndarray]

    def slice(self, a: int, b: int) -> dict[str, np.ndarray]:
        part = {k: v[a:b] for k, v in self.gathered.items()}
        rows = self.rows[a:b]
        part.update((k, v[rows]) for k, v in self.full.items())
        return part


class _Pipeline:
    """Shard thread -> (1 shard) -> batch thread -> (prefetch micro-batches) -> consumer. Holds no loader reference,
    so the loader can be garbage collected (which closes this)."""

    def __init__(self, reader: _ShardReader, prefetch: int, pin_memory: bool, pack: bool = False):
        self._stop = threading.Event()
        self._in_memory = threading.Semaphore(2)  # shards held: the one being cut into batches + the one read ahead
        self._shards: queue.Queue = queue.Queue(maxsize=1)
        self._batches: queue.Queue = queue.Queue(maxsize=prefetch)
        self._reader, self._dir = reader, reader.shard_dir
        self._micro, self._pin = reader.micro, pin_memory and torch.cuda.is_available()
        self._pack = pack
        self.threads = [
            threading.Thread(target=self._read_shards, name="loader-shards", daemon=True),
            threading.Thread(target=self._make_batches, name="loader-batches", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _get_from(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        return None

    def _read_shards(self) -> None:
        name = str(self._dir)
        try:
            for job in self._reader.jobs():
                name = str(self._dir / job.file)
                while not self._in_memory.acquire(timeout=_POLL_S):
                    if self._stop.is_set():
                        return
                if not self._put(self._shards, (name, self._reader.load(job))):
                    return
        except BaseException as e:  # noqa: BLE001 - every failure must reach the consumer, named
            err = ShardError(name, f"{type(e).__name__}: {e}")
            err.__cause__ = e
            self._put(self._shards, err)

    def _make_batches(self) -> None:
        micro, parts, have, name = self._micro, [], 0, str(self._dir)
        try:
            while True:
                item = self._get_from(self._shards)
                if item is None:
                    return
                if isinstance(item, ShardError):
                    self._put(self._batches, item)
                    return
                name, shard = item
                n, start = len(shard.rows), 0
                while start < n:
                    take = min(micro - have, n - start)
                    parts.append(shard.slice(start, start + take))
                    have, start = have + take, start + take
                    if have == micro:
                        if not self._put(self._batches, self._collate(parts)):
                            return
                        parts, have = [], 0
                del shard, item
                self._in_memory.release()
        except BaseException as e:  # noqa: BLE001
            err = ShardError(name, f"{type(e).__name__}: {e}")
            err.__cause__ = e
            self._put(self._batches, err)

    def _collate(self, parts: list[dict[str, np.ndarray]]) -> dict:
        batch = {}
        for key, out_key in BATCH_KEYS.items():
            arr = parts[0][key] if len(parts) == 1 else np.concatenate([p[key] for p in parts])
            batch[out_key] = torch.from_numpy(arr.astype(np.int64))
        if self._pack:  # the unpadded layout, computed here so that the training step never computes an index
            packed = pack(batch["attention_mask"], batch["input_ids"], batch["token_type_ids"],
                          batch["masked_lm_positions"], batch["masked_lm_ids"], batch["next_sentence_labels"])
            batch["packed"] = packed.pin_memory() if self._pin else packed
        elif self._pin:  # (with a packed layout the padded tensors stay on the host, for metrics and tests)
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def get(self):
        while True:
            if self._stop.is_set():
                return None
            try:
                return self._batches.get(timeout=_POLL_S)
            except queue.Empty:
                if not any(t.is_alive() for t in self.threads) and self._batches.empty():
                    return ShardError("loader", "background threads ended without a batch or an error")

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        for q in (self._shards, self._batches):
            while not q.empty():
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
