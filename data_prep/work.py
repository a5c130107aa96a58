"""Phase 1: input files -> blocks of instances on disk (one work unit = a group of input files).

Groups are fixed by the sorted file list and sizes alone, and every random draw is seeded by
(seed, group, block, dupe), so the result does not depend on how many processes or MPI ranks share the work.
Each block (a few thousand documents) is written as .npy files and dropped: memory is one block.

Validation documents (``held_out``: a seeded hash of the document id, so the choice depends on neither the order nor
the worker) are not made into instances here: their token ids go to ``.work/`` as ragged arrays, and
``validation_blocks`` later cuts all groups' held-out documents, in group order, into blocks of their own (so a
held-out article's random next sentences come from other held-out documents, never from training text).
"""

from __future__ import annotations

import hashlib
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
    validation_fraction: float = 0.0


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
    held_out: list[HeldOut] = field(default_factory=list)  # validation documents, tokenized, on disk
    first_kept: tuple[float, str] | None = None  # (score, doc id) of the training document most likely held out


@dataclass
class HeldOut:
    """Held-out documents of one group on disk: ``prefix.ids.npy`` (all ids), ``.sentences.npy`` (ids per sentence),
    ``.docs.npy`` (sentences per document), ``.names.txt`` (doc ids, one a line)."""

    prefix: str
    docs: int
    sentences: int
    tokens: int


def held_out_score(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, document id): a document is held out when it is below the fraction.
    A PubMed record revised in a later update file keeps its PMID, so both versions land on the same side."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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


def process_group(group: int, files: list[str], settings: WorkSettings, work_dir: str,
                  force_held_out: frozenset[str] = frozenset()) -> GroupResult:
    """All blocks of one group. With skip_bad_files, a bad file is dropped and the group redone without it,
    so none of its documents (not even those before the bad record) get in. ``force_held_out``: document ids held
    out whatever their score (the corpus-wide "at least one validation document" rule)."""
    files = list(files)
    skipped: list[str] = []
    while True:
        try:
            result = _process_group_files(group, files, settings, work_dir, force_held_out)
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


def _process_group_files(group: int, files: list[str], settings: WorkSettings, work_dir: str,
                         force_held_out: frozenset[str]) -> GroupResult:
    wp = load_wordpiece(settings.vocab, settings.lower_case)
    result = GroupResult(group=group)
    prefix = os.path.join(work_dir, f"g{group:06d}")
    for old in Path(work_dir).glob(f"g{group:06d}-*"):  # a retried group starts clean
        old.unlink()
    batch: list[list[str]] = []
    held: list[tuple[str, list[str]]] = []
    n_sent = n_held = 0
    block = 0
    for doc in _documents(files):
        sentences = doc.paragraphs if doc.presplit else [s for p in doc.paragraphs for s in split_sentences(p)]
        if not sentences:
            continue
        if settings.validation_fraction > 0:
            score = held_out_score(settings.seed, doc.doc_id)
            if score < settings.validation_fraction or doc.doc_id in force_held_out:
                held.append((doc.doc_id, sentences))
                n_held += len(sentences)
                if len(held) >= settings.block_docs or n_held >= settings.block_sentences:
                    _write_held_out(f"{prefix}-v{len(result.held_out):05d}", held, wp, result)
                    held, n_held = [], 0
                continue
            if result.first_kept is None or (score, doc.doc_id) < result.first_kept:
                result.first_kept = (score, doc.doc_id)
        batch.append(sentences)
        n_sent += len(sentences)
        if len(batch) >= settings.block_docs or n_sent >= settings.block_sentences:
            _write_block(f"{prefix}-b{block:05d}", group, block, batch, wp, settings, result)
            block += 1
            batch, n_sent = [], 0
    if batch:
        _write_block(f"{prefix}-b{block:05d}", group, block, batch, wp, settings, result)
    if held:
        _write_held_out(f"{prefix}-v{len(result.held_out):05d}", held, wp, result)
    return result


def _write_held_out(prefix: str, docs: list[tuple[str, list[str]]], wp: WordPiece, result: GroupResult) -> None:
    """Token ids of held-out documents as ragged arrays (sentences without ids dropped, as for training)."""
    ids = wp.encode([s for _, sents in docs for s in sents])
    names, per_doc, sentences, i = [], [], [], 0
    for name, sents in docs:
        kept = [x for x in ids[i : i + len(sents)] if x]
        i += len(sents)
        if kept:
            names.append(name)
            per_doc.append(len(kept))
            sentences.extend(kept)
    if not names:
        return
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    np.save(f"{prefix}.ids.npy", np.fromiter((t for s in sentences for t in s), dtype=np.int32, count=int(lengths.sum())))
    np.save(f"{prefix}.sentences.npy", lengths)
    np.save(f"{prefix}.docs.npy", np.asarray(per_doc, dtype=np.int64))
    Path(f"{prefix}.names.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    result.docs += len(names)
    result.sentences += len(sentences)
    result.tokens += int(lengths.sum())
    result.held_out.append(HeldOut(prefix=prefix, docs=len(names), sentences=len(sentences), tokens=int(lengths.sum())))


def _read_held_out(part: HeldOut) -> list[list[list[int]]]:
    ids = np.load(f"{part.prefix}.ids.npy")
    bounds = np.concatenate([[0], np.cumsum(np.load(f"{part.prefix}.sentences.npy"))])
    sentences = [ids[bounds[i] : bounds[i + 1]].tolist() for i in range(len(bounds) - 1)]
    docs, start = [], 0
    for n in np.load(f"{part.prefix}.docs.npy").tolist():
        docs.append(sentences[start : start + n])
        start += n
    return docs


def validation_plan(parts: list[HeldOut], block_docs: int, block_sentences: int) -> list[list[tuple[int, int, int]]]:
    """Held-out documents of all groups (in group order) cut into blocks: each block is a list of
    (part index, first doc, end doc). Depends only on the documents, not on who prepared them."""
    blocks, current, docs, sents = [], [], 0, 0
    for k, part in enumerate(parts):
        per_doc = np.load(f"{part.prefix}.docs.npy").tolist()
        lo = 0
        for d, n in enumerate(per_doc):
            docs, sents = docs + 1, sents + n
            if docs >= block_docs or sents >= block_sentences:
                current.append((k, lo, d + 1))
                blocks.append(current)
                current, docs, sents, lo = [], 0, 0, d + 1
        if lo < len(per_doc):
            current.append((k, lo, len(per_doc)))
    if current:
        blocks.append(current)
    return blocks


def validation_block(index: int, pieces: list[tuple[HeldOut, int, int]], settings: WorkSettings,
                     work_dir: str) -> Block:
    """Instances of one validation block: one copy (no dupes), static masks whatever the training masking, so every
    evaluation scores the same masked positions."""
    from dataclasses import replace

    wp = load_wordpiece(settings.vocab, settings.lower_case)
    documents = [doc for part, lo, hi in pieces for doc in _read_held_out(part)[lo:hi]]
    rng = np.random.default_rng([settings.seed, 0x7A11D, index])
    arrays = create_instances(documents, rng, replace(settings.instance, static_masking=True), wp)
    prefix = os.path.join(work_dir, f"val-b{index:05d}")
    for name, arr in arrays.items():
        np.save(f"{prefix}.{name}.npy", arr)
    return Block(prefix=prefix, samples=len(arrays["input_ids"]))


def held_out_names(parts: list[HeldOut]) -> list[str]:
    return [line for part in parts for line in Path(f"{part.prefix}.names.txt").read_text(encoding="utf-8").splitlines()]


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
