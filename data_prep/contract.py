"""The versioned file contract between data_prep and its readers (pretraining, NVIDIA's tools).

Shards are HDF5 files whose datasets follow NVIDIA DeepLearningExamples' BERT schema exactly, so shards made
by either tool work in the other. A shard directory also holds ``manifest.json`` describing every shard.
Readers import only this module from data_prep: the seam is the format, not shared state.

Format versions: 1 = training shards only; 2 adds ``validation`` (held-out documents: their own shards under
``validation/``, with checksums, always statically masked). Version-1 manifests still load (no validation split).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from biobert.files import atomic_write

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
VALIDATION_DIR = "validation"  # held-out shards live in this subdirectory (NVIDIA's layout keeps test/ apart too)
VALIDATION_DOCS = "documents.txt"  # in VALIDATION_DIR: the held-out document ids, one a line
SHARD_SUFFIX = ".hdf5"

# name -> (dtype, rank); shapes are [N, seq_len], [N, max_pred] or [N].
STATIC_SCHEMA: dict[str, tuple[np.dtype, int]] = {
    "input_ids": (np.dtype("int32"), 2),
    "input_mask": (np.dtype("int8"), 2),
    "segment_ids": (np.dtype("int8"), 2),
    "masked_lm_positions": (np.dtype("int32"), 2),
    "masked_lm_ids": (np.dtype("int32"), 2),
    "next_sentence_labels": (np.dtype("int8"), 1),
}
# Dynamic-masking shards keep the unmasked ids; the loader masks each epoch.
DYNAMIC_SCHEMA: dict[str, tuple[np.dtype, int]] = {
    k: v for k, v in STATIC_SCHEMA.items() if k not in ("masked_lm_positions", "masked_lm_ids")
}
SEQUENCE_DATASETS = ("input_ids", "input_mask", "segment_ids")
NSP_RANDOM_NEXT = 1  # next_sentence_labels: 1 = B is a random sentence, 0 = B really follows A (NVIDIA/Google)
PAD_ID = 0  # padding value everywhere; unused prediction slots are position 0 / id 0


def schema_for(masking: str) -> dict[str, tuple[np.dtype, int]]:
    if masking == "static":
        return STATIC_SCHEMA
    if masking == "dynamic":
        return DYNAMIC_SCHEMA
    raise ValueError(f"unknown masking {masking!r} (expected 'static' or 'dynamic')")


def vocab_hash(tokens: list[str]) -> str:
    """sha256 over the vocabulary in id order: two tokenizers agree on ids iff their hashes agree."""
    h = hashlib.sha256()
    for tok in tokens:
        h.update(tok.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def read_vocab_tokens(path: str | os.PathLike) -> list[str]:
    """Tokens in id order from a ``vocab.txt`` or a directory holding ``vocab.txt`` or ``tokenizer.json``."""
    p = Path(path)
    if p.is_dir():
        if (p / "vocab.txt").is_file():
            p = p / "vocab.txt"
        elif (p / "tokenizer.json").is_file():
            vocab = json.loads((p / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
            return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        else:
            raise FileNotFoundError(f"{path}: no vocab.txt or tokenizer.json in this directory")
    with open(p, encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f if line.strip("\r\n") != ""]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardInfo:
    file: str  # relative to the shard directory
    samples: int
    tokens: int  # non-padding tokens
    sha256: str
    seq_len: int


@dataclass
class ValidationSplit:
    """Documents held out of training (chosen by a seeded hash of their ids) and their shards."""

    fraction: float
    documents: int
    sentences: int
    tokens: int  # WordPiece tokens of the held-out text
    instances: int
    masking: str = "static"  # fixed masks: every evaluation scores the same positions
    documents_sha256: str | None = None  # of VALIDATION_DIR/documents.txt
    shards: list[ShardInfo] = field(default_factory=list)  # files relative to the shard directory

    def __post_init__(self) -> None:
        schema_for(self.masking)
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]


@dataclass
class Manifest:
    seq_len: int
    max_predictions: int
    masking: str  # "static" | "dynamic"
    lower_case: bool
    vocab_hash: str
    vocab_size: int
    seed: int
    tool_version: str
    format_version: int = FORMAT_VERSION
    settings: dict = field(default_factory=dict)  # dupe_factor, masked_lm_prob, whole_word_masking, ...
    shards: list[ShardInfo] = field(default_factory=list)
    validation: ValidationSplit | None = None

    def __post_init__(self) -> None:
        schema_for(self.masking)
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        if isinstance(self.validation, dict):
            self.validation = ValidationSplit(**self.validation)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def validation_manifest(self) -> Manifest | None:
        """The validation split as a Manifest of its own (its shards, static masking, same vocab and lengths), so
        every shard check and reader takes it unchanged; None when the directory has no split."""
        v = self.validation
        if v is None or not v.shards:
            return None
        return Manifest(seq_len=self.seq_len, max_predictions=self.max_predictions, masking=v.masking,
                        lower_case=self.lower_case, vocab_hash=self.vocab_hash, vocab_size=self.vocab_size,
                        seed=self.seed, tool_version=self.tool_version, format_version=self.format_version,
                        settings={"split": "validation", "fraction": v.fraction, "documents": v.documents},
                        shards=list(v.shards))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, shard_dir: str | os.PathLike) -> Manifest:
        path = Path(shard_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no manifest (is this a data_prep output directory?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: manifest is not valid JSON: {e}") from None
        if data.get("format_version") not in SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: format_version {data.get('format_version')} is not one this version reads "
                             f"({', '.join(map(str, SUPPORTED_VERSIONS))}): use the data_prep that wrote it")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: manifest fields do not match the contract: {e}") from None

    def save(self, shard_dir: str | os.PathLike) -> None:
        atomic_write(Path(shard_dir) / MANIFEST_NAME, self.to_json())

