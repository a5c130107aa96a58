"""Train a domain WordPiece vocab from the corpus (the PubMedBERT option) with HF `tokenizers`.

    python data_prep/vocab.py INPUT... --output-dir DIR --vocab-size N [--lower-case|--cased]

Writes DIR/vocab.txt (BERT special tokens first) and DIR/tokenizer_config.json (do_lower_case), so the
result is accepted by `run.py --vocab DIR` and by HF's BertTokenizer. Text is streamed; nothing is held.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python data_prep/vocab.py`: import siblings as data_prep.x
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tokenizers.implementations import BertWordPieceTokenizer

from data_prep.contract import atomic_write_text
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
    atomic_write_text(out / "vocab.txt", "".join(t + "\n" for t in tokens))
    config = {"do_lower_case": lower_case, "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
              "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
              "strip_accents": lower_case, "model_max_length": 512}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))
    return out / "vocab.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="data_prep/vocab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--vocab-size", type=int, required=True)
    case = ap.add_mutually_exclusive_group()
    case.add_argument("--lower-case", dest="lower_case", action="store_true", default=False)
    case.add_argument("--cased", dest="lower_case", action="store_false")
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        path = train_vocab(args.inputs, args.output_dir, args.vocab_size, args.lower_case, args.min_frequency)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(1 for _ in open(path, encoding="utf-8"))
    print(f"vocab: {n} tokens ({'uncased' if args.lower_case else 'cased'}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
