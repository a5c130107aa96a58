"""PubMed / PMC / plain text -> NVIDIA-compatible BERT pretraining shards.

    biobert prep INPUT... --output-dir DIR --vocab VOCAB [--lower-case|--cased] [--seq-len 128|512]
        [--max-predictions N] [--dupe-factor N] [--num-shards N] [--workers N] [--seed N] [--dynamic-masking]
        [--validation-fraction F] [--skip-bad-files]

A seeded fraction of the documents (--validation-fraction, default 1%, at least one document once the corpus has
MIN_DOCS_FOR_VALIDATION) is held out: DIR/validation/ gets its own shards (one copy, static masks), listed with their
checksums under "validation" in manifest.json, and the held-out document ids in DIR/validation/documents.txt.

Runs on one node with a process pool (--workers) and across nodes with `mpirun -n N biobert prep ...` (mpi4py; the
output directory must be on a shared filesystem). The output depends only on the inputs, settings and seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from biobert.config import option, parse
from biobert.errors import run
from biobert.files import atomic_write
from data_prep import contract, shards
from data_prep.extract import DataError, find_inputs
from data_prep.instances import InstanceConfig
from data_prep.wordpiece import load_wordpiece
from data_prep.work import (
    WorkSettings,
    group_files,
    held_out_names,
    process_group,
    reset_work_dir,
    validation_block,
    validation_plan,
)

TOOL_VERSION = "biobert-data-prep 0.2.0"
MIN_DOCS_FOR_VALIDATION = 4  # below this a held-out document would take too much from training; none is forced
log = logging.getLogger("data_prep")


@dataclass(kw_only=True)
class PrepConfig:
    """PubMed / PMC / text -> pretraining shards."""

    inputs: list[str] = option(help="files or directories of .xml, .xml.gz (PubMed), .nxml (PMC JATS), .txt",
                               positional=True)
    output_dir: str = option(help="directory for the shards and manifest.json")
    vocab: str = option(help="vocab.txt or an HF tokenizer/model directory")
    lower_case: bool | None = option(None, "lower-case the text (the vocab must be uncased); default: follow the vocab",
                                     false_aliases=["--cased"])
    seq_len: int = option(128, "tokens per instance: 128 or 512 (any value in [8, 4096] works)")
    max_predictions: int | None = option(None, "masked positions per instance (default: 20 for 128, 80 for 512)")
    masked_lm_prob: float = option(0.15, "fraction of tokens masked")
    short_seq_prob: float = option(0.1, "fraction of instances made shorter than seq_len (BERT's short_seq_prob)")
    dupe_factor: int = option(1, "copies of the corpus with different pairs/masks (dynamic masking makes copies "
                                 "redundant; static masking: 5-10 as in NVIDIA/Google)")
    num_shards: int | None = option(None, "number of shards (default: one per 65,536 instances)")
    workers: int | None = option(None, "processes per node (default: every core; one per rank under mpirun)")
    seed: int = option(12345, "seed: the output bytes depend only on inputs, settings and seed")
    dynamic_masking: bool = option(False, "store unmasked ids (smaller shards); the loader masks anew each epoch")
    validation_fraction: float = option(0.01, "documents held out for validation (seeded by document id; at least "
                                              "one once the corpus has 4); 0 = none")
    whole_word_masking: bool = option(False, "mask whole words (all their WordPiece pieces) together")
    skip_bad_files: bool = option(False, "log unreadable inputs and go on without them")
    block_docs: int = option(2000, "documents per instance block (NSP random sentences come from the same block)")
    block_sentences: int = option(20000, "sentences per instance block")
    group_mb: float = option(4.0, "input MB per work unit (small files are grouped)")
    progress: bool = option(True, "progress bars")
    settings: dict = option(factory=dict, help="filled in by the run: what went into the fingerprint", flag=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no inputs given")
        if self.max_predictions is None:
            self.max_predictions = max(1, self.seq_len * 5 // 32)
        for name in ("dupe_factor", "block_docs", "block_sentences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0.0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction must be in [0, 0.5], got {self.validation_fraction}")
        self.instance_config()  # validates seq_len, max_predictions, probabilities

    @property
    def masking(self) -> str:
        return "dynamic" if self.dynamic_masking else "static"

    def instance_config(self) -> InstanceConfig:
        return InstanceConfig(
            seq_len=self.seq_len,
            max_predictions=self.max_predictions,
            masked_lm_prob=self.masked_lm_prob,
            short_seq_prob=self.short_seq_prob,
            whole_word_masking=self.whole_word_masking,
            static_masking=not self.dynamic_masking,
        )


def parse_args(argv: list[str] | None) -> PrepConfig:
    return parse(PrepConfig, argv, prog="biobert prep", description=__doc__)


class _Cluster:
    """The MPI world when launched by mpirun, else a world of one (mpi4py is only imported under mpirun)."""

    def __init__(self) -> None:
        self.comm = None
        if any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_size() > 1:
                self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank() if self.comm else 0
        self.size = self.comm.Get_size() if self.comm else 1

    def allgather(self, obj):
        return self.comm.allgather(obj) if self.comm else [obj]

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0) if self.comm else obj

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()


def _assign(sizes: list[int], ranks: int) -> list[int]:
    """Largest task first to the least loaded rank: deterministic, balanced by bytes."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _worker_init(vocab: str | None = None, lower_case: bool | None = None) -> None:
    # One core per worker: the Rust tokenizer would otherwise spawn a thread per core in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if vocab is not None:
        try:
            load_wordpiece(vocab, lower_case)  # cached for the tasks to come
        except DataError:
            pass  # the parent reports it


def _call(args):
    fn, *rest = args
    return fn(*rest)


class _Workers:
    """Runs (fn, *args) tasks in-process (one worker) or in a spawn pool that both phases share: each worker
    start costs ~1 s of imports and a vocab load, so it happens once."""

    def __init__(self, n: int, vocab: str, lower_case: bool | None) -> None:
        self.n, self.pool = n, None
        if n > 1:  # start now: worker start-up (imports, vocab) overlaps with the parent's own set-up
            self.pool = mp.get_context("spawn").Pool(n, initializer=_worker_init, initargs=(vocab, lower_case))

    def run(self, tasks: list[tuple], desc: str, show: bool) -> list:
        """Results in task order."""
        bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not show, leave=False)
        results = [None] * len(tasks)
        try:
            if self.pool is None:  # in-process: the tokenizer may use every core (the benchmark pins it to one)
                for i, t in enumerate(tasks):
                    results[i] = _call(t)
                    bar.update()
            else:
                for i, r in self.pool.imap_unordered(_indexed, list(enumerate(tasks))):
                    results[i] = r
                    bar.update()
        finally:
            bar.close()
        return results

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.terminate() if cancel else self.pool.close()
            self.pool.join()


def _indexed(item):
    i, t = item
    return i, _call(t)


def fingerprint(cfg: PrepConfig, files: list[Path], vocab_hash: str, lower_case: bool) -> str:
    """Everything the bytes of the output depend on."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "output_dir", "vocab", "workers",
                                                                   "progress", "settings")}
    settings.update(lower_case=lower_case, vocab_hash=vocab_hash, tool=TOOL_VERSION,
                    files=[(f.name, f.stat().st_size) for f in files])
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def main(argv: list[str] | PrepConfig | None = None) -> dict:
    """Run data prep; returns the summary dict. Raises DataError on bad input (the CLI turns it into exit 2)."""
    cfg = argv if isinstance(argv, PrepConfig) else parse_args(argv)
    t0 = time.perf_counter()
    cluster = _Cluster()
    workers = _Workers(cfg.workers or (1 if cluster.size > 1 else os.cpu_count() or 1), str(cfg.vocab), cfg.lower_case)
    try:
        summary = _prepare(cfg, t0, cluster, workers)
    except BaseException:
        workers.close(cancel=True)  # do not wait for the other files once one has failed
        raise
    workers.close()
    return summary


def _prepare(cfg: PrepConfig, t0: float, cluster: _Cluster, workers: _Workers) -> dict:
    files = find_inputs(cfg.inputs)
    vocab = load_wordpiece(str(cfg.vocab), cfg.lower_case)  # fails early on a casing mismatch
    fp = fingerprint(cfg, files, vocab.vocab_hash, vocab.lower_case)
    out = Path(cfg.output_dir)
    summary = dict(docs=0, sentences=0, tokens=0, instances=0, shards=0, skipped_files=[], reused_shards=0,
                   output_dir=str(out))

    manifest = shards.up_to_date(str(out), fp) if cluster.rank == 0 else None
    if cluster.bcast(manifest is not None):
        manifest = cluster.bcast(manifest)
        summary.update(manifest.settings.get("summary", {}), reused_shards=len(manifest.shards),
                       shards=len(manifest.shards))
        return _finish_summary(summary, t0, cluster, up_to_date=True)

    work_dir = out / ".work"
    if cluster.rank == 0:
        shards.start_run(str(out), fp)  # from now on the directory is visibly incomplete
        reset_work_dir(work_dir)
    cluster.barrier()
    try:
        return _build(cfg, t0, cluster, workers, files, vocab, fp, summary)
    except BaseException:
        if cluster.rank == 0:
            shards.abandon_run(str(out))
            shutil.rmtree(work_dir, ignore_errors=True)
        raise


def _build(cfg: PrepConfig, t0: float, cluster: _Cluster, workers: _Workers, files: list[Path], vocab, fp: str,
           summary: dict) -> dict:
    out = Path(cfg.output_dir)
    work_dir = out / ".work"
    show = cfg.progress and cluster.rank == 0
    # Phase 1: groups of input files -> instance blocks.
    # vocab and lower_case exactly as loaded above: the same load_wordpiece cache key, so no second load
    settings = WorkSettings(vocab=str(cfg.vocab), lower_case=cfg.lower_case, instance=cfg.instance_config(),
                            seed=cfg.seed, dupe_factor=cfg.dupe_factor, block_docs=cfg.block_docs,
                            block_sentences=cfg.block_sentences, skip_bad_files=cfg.skip_bad_files,
                            validation_fraction=cfg.validation_fraction)
    groups = group_files(files, int(cfg.group_mb * 2**20))
    owner = _assign([sum(f.stat().st_size for f in g) for g in groups], cluster.size)
    mine = [(process_group, i, [str(f) for f in g], settings, str(work_dir))
            for i, g in enumerate(groups) if owner[i] == cluster.rank]
    results, error = _collective(lambda: workers.run(mine, "documents", show), cluster)
    if error:
        raise DataError(error)
    results = sorted((r for rs in results for r in rs), key=lambda r: r.group)
    results = _hold_out_at_least_one(cfg, cluster, workers, groups, owner, settings, work_dir, results, show)
    blocks = [b for r in results for b in r.blocks]
    for key in ("docs", "sentences", "tokens"):
        summary[key] = sum(getattr(r, key) for r in results)
    summary["skipped_files"] = [s for r in results for s in r.skipped]
    held = [h for r in results for h in r.held_out]
    val_blocks = _validation_blocks(cluster, workers, held, settings, work_dir, show)
    total = sum(b.samples for b in blocks)
    if total == 0:
        raise DataError(f"no pretraining instances from {len(files)} input file(s): no document had any text")
    num_shards = cfg.num_shards or max(1, math.ceil(total / 65536))
    if num_shards > total:
        raise DataError(f"only {total} instances, fewer than --num-shards {num_shards}")

    # Phase 2: blocks -> shards (any rank can write any shard).
    ordered = shards.block_order(blocks, cfg.seed)
    attrs = dict(seq_len=cfg.seq_len, max_predictions=cfg.max_predictions, vocab_hash=vocab.vocab_hash)
    todo, infos = [], {}
    for k in range(num_shards):
        if k % cluster.size != cluster.rank:
            continue
        done = shards.completed_shard(str(out), k, num_shards, fp)
        if done is not None:
            infos[k] = done
        else:
            todo.append((shards.build_shard, str(out), k, num_shards, ordered, cfg.seed, cfg.masking, attrs, fp))
    written, error = _collective(lambda: workers.run(todo, "shards", show), cluster)
    if error:
        raise DataError(error)
    reused = sum(len(i) for i in cluster.allgather(infos))
    all_infos = {}
    for part in cluster.allgather(infos):
        all_infos.update(part)
    for rank_written in written:
        for info in rank_written:
            all_infos[int(info.file.split("-")[1])] = info
    summary.update(instances=total, shards=num_shards, reused_shards=reused)
    validation = _validation_shards(cfg, cluster, workers, held, val_blocks, attrs, fp, show)
    if validation is not None:
        summary["validation"] = {k: v for k, v in asdict(validation).items() if k != "shards"} | {
            "shards": len(validation.shards)}

    if cluster.rank == 0:
        manifest = contract.Manifest(
            seq_len=cfg.seq_len, max_predictions=cfg.max_predictions, masking=cfg.masking,
            lower_case=vocab.lower_case, vocab_hash=vocab.vocab_hash, vocab_size=vocab.vocab_size, seed=cfg.seed,
            tool_version=TOOL_VERSION,
            settings=dict(fingerprint=fp, dupe_factor=cfg.dupe_factor, masked_lm_prob=cfg.masked_lm_prob,
                          short_seq_prob=cfg.short_seq_prob, whole_word_masking=cfg.whole_word_masking,
                          inputs=[str(f) for f in files], validation_fraction=cfg.validation_fraction,
                          summary={k: summary[k] for k in ("docs", "sentences", "tokens", "instances", "validation")
                                   if k in summary}),
            shards=[all_infos[k] for k in range(num_shards)],
            validation=validation,
        )
        shards.finish(str(out), manifest)
        shutil.rmtree(work_dir)
    cluster.barrier()
    return _finish_summary(summary, t0, cluster)


def _hold_out_at_least_one(cfg, cluster, workers, groups, owner, settings, work_dir, results, show):
    """The corpus-wide rule "at least one validation document once there are MIN_DOCS_FOR_VALIDATION": when the
    seeded scores held out none, the training document with the lowest score is held out, by redoing its group
    (every rank decides alike from the gathered results, the group's owner redoes it)."""
    if cfg.validation_fraction <= 0 or any(r.held_out for r in results):
        return results
    if sum(r.docs for r in results) < MIN_DOCS_FOR_VALIDATION:
        return results
    candidates = [(r.first_kept, r.group) for r in results if r.first_kept is not None]
    (_, doc_id), group = min(candidates)
    task = [(process_group, group, [str(f) for f in groups[group]], settings, str(work_dir), frozenset({doc_id}))]
    redone, error = _collective(lambda: workers.run(task if owner[group] == cluster.rank else [], "hold-out", show),
                                cluster)
    if error:
        raise DataError(error)
    (new,) = [r for rs in redone for r in rs]
    return [new if r.group == group else r for r in results]


def _validation_blocks(cluster, workers, held, settings, work_dir, show):
    """Held-out documents -> validation instance blocks, split over ranks by block index."""
    if not held:
        return []
    plan = validation_plan(held, settings.block_docs, settings.block_sentences)
    mine = [(validation_block, i, [(held[k], lo, hi) for k, lo, hi in pieces], settings, str(work_dir))
            for i, pieces in enumerate(plan) if i % cluster.size == cluster.rank]
    made, error = _collective(lambda: workers.run(mine, "validation", show), cluster)
    if error:
        raise DataError(error)
    return sorted((b for part in made for b in part), key=lambda b: b.prefix)


def _validation_shards(cfg, cluster, workers, held, val_blocks, attrs, fp, show) -> contract.ValidationSplit | None:
    """DIR/validation/: shards of the held-out documents (one per 65,536 instances, any rank writes any)."""
    total = sum(b.samples for b in val_blocks)
    if total == 0:
        return None
    out = Path(cfg.output_dir) / contract.VALIDATION_DIR
    n = max(1, math.ceil(total / 65536))
    ordered = shards.block_order(val_blocks, cfg.seed, stream=1)
    todo, infos = [], {}
    for k in range(n):
        if k % cluster.size != cluster.rank:
            continue
        done = shards.completed_shard(str(out), k, n, fp)
        if done is not None:
            infos[k] = done
        else:
            todo.append((shards.build_shard, str(out), k, n, ordered, cfg.seed, "static", attrs, fp, 1))
    written, error = _collective(lambda: workers.run(todo, "validation shards", show), cluster)
    if error:
        raise DataError(error)
    for part in cluster.allgather(infos):
        infos.update(part)
    for info in (i for rank_written in written for i in rank_written):
        infos[int(info.file.split("-")[1])] = info
    names = held_out_names(held)
    if cluster.rank == 0:
        atomic_write(out / contract.VALIDATION_DOCS, "".join(name + "\n" for name in names))
    for info in infos.values():
        if not info.file.startswith(contract.VALIDATION_DIR + "/"):
            info.file = f"{contract.VALIDATION_DIR}/{info.file}"
    if len(names) == 1 and cluster.rank == 0:
        log.warning("only one document is held out for validation: its NSP accuracy says little (random next "
                    "sentences need other documents); raise --validation-fraction for a larger corpus")
    return contract.ValidationSplit(
        fraction=cfg.validation_fraction, documents=len(names), sentences=sum(h.sentences for h in held),
        tokens=sum(h.tokens for h in held), instances=total, masking="static",
        documents_sha256=hashlib.sha256("".join(name + "\n" for name in names).encode()).hexdigest(),
        shards=[infos[k] for k in range(n)])


def _collective(fn, cluster: _Cluster):
    """Run fn on every rank; gather results, or the first error (so no rank waits forever on a failed one)."""
    try:
        local, err = fn(), None
    except DataError as e:
        local, err = None, str(e)
    gathered = cluster.allgather((local, err))
    errors = [e for _, e in gathered if e]
    return [r for r, _ in gathered], (errors[0] if errors else None)


def _finish_summary(summary: dict, t0: float, cluster: _Cluster, up_to_date: bool = False) -> dict:
    seconds = time.perf_counter() - t0
    summary.update(seconds=round(seconds, 3), tokens_per_s=round(summary["tokens"] / seconds, 1) if seconds else 0.0,
                   up_to_date=up_to_date)
    if cluster.rank == 0:
        note = " (already complete, nothing to do)" if up_to_date else ""
        val = summary.get("validation")
        held = f" ({val['documents']} held out for validation: {val['instances']} instances)" if val else ""
        print(f"data_prep: {summary['docs']} docs{held}, {summary['sentences']} sentences, {summary['tokens']} tokens, "
              f"{summary['instances']} instances, {summary['shards']} shards in {seconds:.1f} s "
              f"({summary['tokens'] / max(seconds, 1e-9):,.0f} tokens/s) -> {summary['output_dir']}{note}")
        for s in summary["skipped_files"]:
            print(f"data_prep: skipped {s}", file=sys.stderr)
    return summary


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
