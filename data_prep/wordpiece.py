"""WordPiece tokenization with HuggingFace `tokenizers` (Rust, batched), casing checked against the vocab.

NVIDIA's script lower-cases whatever the vocab is; here the casing flag and the vocab must agree, because a
mismatch silently trains on [UNK]s (uncased vocab + cased text) or throws away case (BioBERT is cased).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from data_prep.contract import read_vocab_tokens, vocab_hash
from data_prep.extract import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocab_is_cased(tokens: list[str]) -> bool:
    """A cased vocab has many tokens with A-Z (bert-base-cased: ~10k); an uncased one has none outside [SPECIALS]
    (a stray symbol like '\u211d' is not evidence, hence ASCII and a threshold)."""
    upper = sum(1 for t in tokens if not t.startswith("[") and any("A" <= c <= "Z" for c in t))
    return upper > max(20, len(tokens) // 200)


def declared_lower_case(vocab: Path) -> bool | None:
    """do_lower_case from an HF tokenizer_config.json beside the vocab, when there is one."""
    cfg = (vocab if vocab.is_dir() else vocab.parent) / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case")
        if isinstance(value, bool):
            return value
    return None


@dataclass
class WordPiece:
    """A loaded vocab: encode sentences to int32 id arrays, plus what instance creation needs to know about ids."""

    tokenizer: Tokenizer
    tokens: list[str]
    lower_case: bool
    source: str

    def __post_init__(self) -> None:
        ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        # Token classes as arrays indexed by id, so masking decisions are numpy gathers, not Python loops.
        self.is_special = np.zeros(len(self.tokens), dtype=bool)
        for i, t in enumerate(self.tokens):
            if t.startswith("[") and t.endswith("]") and len(t) > 2:
                self.is_special[i] = True
        self.is_continuation = np.array([t.startswith("##") for t in self.tokens], dtype=bool)
        # Random replacements (the 10% case) come from real tokens only, never [CLS]/[SEP]/[PAD]/[unusedN].
        self.replacement_ids = np.flatnonzero(~self.is_special).astype(np.int32)
        self.vocab_hash = vocab_hash(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, sentences: list[str], batch: int = 2048) -> list[list[int]]:
        """Ids of each sentence (no [CLS]/[SEP]), in batched Rust calls. Batches stay small because an Encoding
        also holds token strings and offsets (~10x the ids): a whole block of them would dominate memory."""
        out: list[list[int]] = []
        for i in range(0, len(sentences), batch):
            out.extend(e.ids for e in self.tokenizer.encode_batch_fast(sentences[i : i + batch], add_special_tokens=False))
        return out


@functools.lru_cache(maxsize=4)
def load_wordpiece(vocab: str | os.PathLike, lower_case: bool | None = None) -> WordPiece:
    """Load a vocab.txt, or an HF tokenizer/model dir (vocab.txt or tokenizer.json).

    lower_case None follows the vocab (tokenizer_config.json, else its tokens); True/False must agree with it.
    Cached per process: loading a 30k vocab costs ~0.2 s, more than tokenizing a small file.
    """
    path = Path(vocab)
    if not path.exists():
        raise DataError(f"{path}: vocab not found (expected a vocab.txt or an HF tokenizer directory)")
    try:
        tokens = read_vocab_tokens(path)
    except (FileNotFoundError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read vocab: {e}") from None
    missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
    if missing:
        raise DataError(f"{path}: vocab lacks BERT special tokens {missing}")
    declared = declared_lower_case(path)
    vocab_lower = (not vocab_is_cased(tokens)) if declared is None else declared
    kind = "uncased" if vocab_lower else "cased"
    how = "tokenizer_config.json do_lower_case" if declared is not None else "its tokens"
    if lower_case is None:
        lower_case = vocab_lower
    elif lower_case != vocab_lower:
        flag = "--lower-case" if lower_case else "--cased"
        fix = "--cased" if not vocab_lower else "--lower-case"
        raise DataError(
            f"{path}: vocab is {kind} (from {how}) but {flag} was given; "
            f"use {fix} or a {'cased' if lower_case is False else 'uncased'} vocab"
        )
    wp = BertWordPieceTokenizer({t: i for i, t in enumerate(tokens)}, lowercase=lower_case)
    return WordPiece(tokenizer=wp._tokenizer, tokens=tokens, lower_case=lower_case, source=str(path))
