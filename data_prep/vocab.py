"""Train a domain WordPiece vocab from the corpus (the PubMedBERT option) with HF `tokenizers`.

    biobert vocab INPUT... --output-dir DIR --vocab-size N [--lower-case|--cased]

Writes DIR/vocab.txt (BERT special tokens first) and DIR/tokenizer_config.json (do_lower_case), so the
result is accepted by `biobert prep --vocab DIR` and by HF's BertTokenizer. Text is streamed; nothing is held.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers.implementations import BertWordPieceTokenizer

from biobert.config import option, parse
from biobert.errors import run
from biobert.files import atomic_write
from data_prep.extract import DataError, find_inputs, iter_documents
from data_prep.sentences import split_sentences
from data_prep.wordpiece import SPECIAL_TOKENS


def iter_sentences(files):
    for f in files:
        for doc in iter_documents(f):
            if doc.presplit:
                yield from doc.paragraphs
            else:
                for p in doc.paragraphs:
                    yield from split_sentences(p)


def train_vocab(inputs: list[str], output_dir: str | Path, vocab_size: int, lower_case: bool = False,
                min_frequency: int = 2) -> Path:
    """Train and write the vocab; returns the path of vocab.txt."""
    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    files = find_inputs(inputs)
    tok = BertWordPieceTokenizer(lowercase=lower_case, strip_accents=lower_case)
    tok.train_from_iterator(iter_sentences(files), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(SPECIAL_TOKENS), limit_alphabet=1000, wordpieces_prefix="##",
                            show_progress=False)
    vocab = tok.get_vocab()
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise DataError(f"no text to train a vocab from in {', '.join(map(str, inputs))}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    atomic_write(out / "vocab.txt", "".join(t + "\n" for t in tokens))
    config = {"do_lower_case": lower_case, "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
              "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
              "strip_accents": lower_case, "model_max_length": 512}
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2))
    return out / "vocab.txt"


@dataclass(kw_only=True)
class VocabConfig:
    """Train a WordPiece vocab from the corpus."""

    inputs: list[str] = option(help="files or directories of .xml, .xml.gz, .nxml, .txt", positional=True)
    output_dir: str = option(help="directory for vocab.txt and tokenizer_config.json")
    vocab_size: int = option(help="tokens in the vocab, special tokens included (BERT: 30522, BioBERT: 28996)")
    lower_case: bool = option(False, "lower-case the text (an uncased vocab)", false_aliases=["--cased"])
    min_frequency: int = option(2, "drop pieces seen fewer times")


def main(cfg: VocabConfig) -> Path:
    path = train_vocab(cfg.inputs, cfg.output_dir, cfg.vocab_size, cfg.lower_case, cfg.min_frequency)
    n = sum(1 for _ in open(path, encoding="utf-8"))
    print(f"vocab: {n} tokens ({'uncased' if cfg.lower_case else 'cased'}) -> {path}")
    return path


def cli(argv: list[str] | None = None) -> int:
    main(parse(VocabConfig, argv, prog="biobert vocab", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
