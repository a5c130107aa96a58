"""Phase 1: input files -> blocks of instances on disk (one work unit = a group of input files).

Groups are fixed by the sorted file list and sizes alone, and every random draw is seeded by
(seed, group, block, dupe), so the result does not depend on how many processes or MPI ranks share the work.
Each block (a few thousand documents) is written as .npy files and dropped: memory is one block.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.extract import DataError, iter_documents
from data_prep.instances import InstanceConfig, create_instances
from data_prep.sentences import split_sentences
from data_prep.wordpiece import WordPiece, load_wordpiece

log = logging.getLogger("data_prep")


@dataclass(frozen=True)
class WorkSettings:
    vocab: str
    lower_case: bool | None  # the flag as given (None: follow the vocab)
    instance: InstanceConfig
    seed: int
    dupe_factor: int
    block_docs: int
    block_sentences: int
    skip_bad_files: bool


@dataclass
class Block:
    prefix: str  # path prefix of its .npy files
    samples: int


@dataclass
class GroupResult:
    group: int
    blocks: list[Block] = field(default_factory=list)
    docs: int = 0
    sentences: int = 0
    tokens: int = 0  # WordPiece tokens of the input text (each counted once, not per dupe)
    skipped: list[str] = field(default_factory=list)  # "file: reason" for --skip-bad-files


def group_files(files: list[Path], group_bytes: int) -> list[list[Path]]:
    """Consecutive files until a group holds ~group_bytes of text (gzip counted x4). Many small PMC files
    share a group, so random next sentences come from other articles and tasks are not too small."""
    groups: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for f in files:
        current.append(f)
        size += f.stat().st_size * (4 if f.name.endswith(".gz") else 1)
        if size >= group_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def process_group(group: int, files: list[str], settings: WorkSettings, work_dir: str) -> GroupResult:
    """All blocks of one group. With skip_bad_files, a bad file is dropped and the group redone without it,
    so none of its documents (not even those before the bad record) get in."""
    files = list(files)
    skipped: list[str] = []
    while True:
        try:
            result = _process_group_files(group, files, settings, work_dir)
            result.skipped = skipped
            return result
        except _BadFile as bad:
            if not settings.skip_bad_files:
                raise bad.error from None
            log.warning("skipping bad file: %s", bad.error)
            skipped.append(str(bad.error))
            files.remove(bad.file)


class _BadFile(Exception):
    def __init__(self, file: str, error: DataError):
        self.file, self.error = file, error


def _documents(files: list[str]):
    for f in files:
        try:
            yield from iter_documents(f)
        except DataError as e:
            raise _BadFile(f, e) from None


def _process_group_files(group: int, files: list[str], settings: WorkSettings, work_dir: str) -> GroupResult:
    wp = load_wordpiece(settings.vocab, settings.lower_case)
    result = GroupResult(group=group)
    prefix = os.path.join(work_dir, f"g{group:06d}")
    for old in Path(work_dir).glob(f"g{group:06d}-*"):  # a retried group starts clean
        old.unlink()
    batch: list[list[str]] = []
    n_sent = 0
    block = 0
    for doc in _documents(files):
        sentences = doc.paragraphs if doc.presplit else [s for p in doc.paragraphs for s in split_sentences(p)]
        if not sentences:
            continue
        batch.append(sentences)
        n_sent += len(sentences)
        if len(batch) >= settings.block_docs or n_sent >= settings.block_sentences:
            _write_block(f"{prefix}-b{block:05d}", group, block, batch, wp, settings, result)
            block += 1
            batch, n_sent = [], 0
    if batch:
        _write_block(f"{prefix}-b{block:05d}", group, block, batch, wp, settings, result)
    return result


def _write_block(prefix, group, block, docs_text, wp: WordPiece, settings: WorkSettings, result: GroupResult) -> None:
    flat = [s for d in docs_text for s in d]
    ids = wp.encode(flat)
    documents: list[list[list[int]]] = []
    i = 0
    for d in docs_text:
        sents = [x for x in ids[i : i + len(d)] if x]  # a sentence of only dropped characters has no ids
        i += len(d)
        if sents:
            documents.append(sents)
    result.docs += len(documents)
    result.sentences += sum(map(len, documents))
    result.tokens += sum(len(s) for d in documents for s in d)
    if not documents:
        return
    for dupe in range(settings.dupe_factor):  # each copy is its own block on disk: memory holds one at a time
        rng = np.random.default_rng([settings.seed, group, block, dupe])
        arrays = create_instances(documents, rng, settings.instance, wp)
        for name, arr in arrays.items():
            np.save(f"{prefix}-d{dupe:03d}.{name}.npy", arr)
        result.blocks.append(Block(prefix=f"{prefix}-d{dupe:03d}", samples=len(arrays["input_ids"])))


def load_block(block: Block, names, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of a block, memory-mapped so only those rows are read."""
    return {n: np.load(f"{block.prefix}.{n}.npy", mmap_mode="r")[lo:hi] for n in names}


def reset_work_dir(work_dir: Path) -> None:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
