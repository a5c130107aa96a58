"""Data prep throughput vs the practical ceiling (raw `tokenizers` batch encoding of the same text, one core).

    python -m benchmarks.prep_bench [--inputs DIR_OR_FILES...] [--vocab VOCAB] [--workers 1 2]

Prints docs/s, tokens/s, shard MB/s and peak memory for each worker count, and end-to-end tokens/s per worker
as a fraction of the ceiling. Default input: the shared MEDLINE sample ($BIOBERT_DATA/corpus/pubmed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from biobert.config import option, parse
from data_prep import run
from data_prep.demo import default_vocab
from data_prep.extract import find_inputs, iter_documents
from data_prep.sentences import split_sentences
from data_prep.wordpiece import load_wordpiece


def default_inputs() -> list[str]:
    root = Path(os.environ.get("BIOBERT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return [str(root / "corpus" / "pubmed")]


def ceiling(inputs: list[str], vocab: str, repeats: int = 3) -> tuple[float, float, int]:
    """Best-of-N tokens/s (wall, CPU) of batched encoding alone on the corpus's sentences (extraction not timed).

    Runs in a child process so the sentences it holds do not count toward the pipeline's peak memory.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_ceiling, (inputs, vocab, repeats))


def _ceiling(inputs, vocab, repeats):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    wp = load_wordpiece(vocab)
    sentences = [s for f in find_inputs(inputs) for d in iter_documents(f) for p in d.paragraphs
                 for s in split_sentences(p)]
    wall, cpu, tokens = 0.0, 0.0, 0
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        tokens = sum(map(len, wp.encode(sentences)))
        wall = max(wall, tokens / (time.perf_counter() - t))
        cpu = max(cpu, tokens / (time.process_time() - c))
    return wall, cpu, tokens


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def end_to_end(inputs: list[str], vocab: str, workers: int, **kw) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = run.PrepConfig(inputs=inputs, output_dir=out, vocab=vocab, workers=workers, progress=False, **kw)
        c = _cpu_seconds()
        s = run.main(cfg)
        s["cpu_seconds"] = _cpu_seconds() - c
        s["shard_bytes"] = sum(p.stat().st_size for p in Path(out).glob("shard-*"))
    return s


@dataclass(kw_only=True)
class PrepBenchConfig:
    """data_prep throughput against raw `tokenizers` (the ceiling)."""

    inputs: list[str] | None = option(None, "corpus files/dirs (default: the shared MEDLINE sample, else the demo "
                                            "corpus)")
    vocab: str | None = option(None, "vocab.txt or tokenizer dir (default: the packaged MiniLM's)")
    workers: list[int] = option(factory=lambda: [1, 2], help="worker counts to measure")
    seq_len: int = option(128, "instance length")
    dupe_factor: int = option(1, "corpus copies with different masks")
    dynamic_masking: bool = option(False, "write unmasked (dynamic-masking) shards")
    copies: int = option(1, "symlink the inputs N times: a bigger corpus amortises worker start-up (~1 CPU-s each) "
                            "as real PubMed files do")


def main(args: PrepBenchConfig) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, as in the pool; the ceiling is one core too
    inputs = args.inputs or default_inputs()
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as links:
        if args.copies > 1:
            for c in range(args.copies):
                for f in find_inputs(inputs):
                    (Path(links) / f"copy{c}-{f.name}").symlink_to(f.resolve())
            inputs = [links]
        _report(inputs, args)
    return 0


def _report(inputs: list[str], args) -> None:
    vocab = str(args.vocab or default_vocab())
    top, top_cpu, tokens = ceiling(inputs, vocab)
    print(f"ceiling: tokenizers encode_batch_fast, 1 thread: {top:,.0f} tokens/s wall, {top_cpu:,.0f} tokens/CPU-s "
          f"({tokens:,} tokens) on {inputs}")
    kw = dict(seq_len=args.seq_len, dupe_factor=args.dupe_factor, dynamic_masking=args.dynamic_masking)
    for w in args.workers:
        s = end_to_end(inputs, vocab, w, **kw)
        sec = s["seconds"]
        rate = s["tokens"] / sec
        per_cpu = s["tokens"] / s["cpu_seconds"]
        print(f"workers={w}: {s['docs'] / sec:,.0f} docs/s, {rate:,.0f} tokens/s, "
              f"{s['shard_bytes'] / 2**20 / sec:.1f} shard MB/s, {s['instances']:,} instances in {sec:.2f} s; "
              f"per worker {rate / w / top:.2f}x ceiling (wall), {per_cpu / top_cpu:.2f}x ceiling (per CPU-second)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS of the 1-worker pipeline: {peak / 1024:.0f} MB; cores on this machine: {os.cpu_count()}; "
          f"settings: seq_len={args.seq_len} dupe_factor={args.dupe_factor} "
          f"masking={'dynamic' if args.dynamic_masking else 'static'}")


def cli(argv: list[str] | None = None) -> int:
    return main(parse(PrepBenchConfig, argv, prog="biobert bench prep", description=__doc__))


if __name__ == "__main__":
    sys.exit(cli())
