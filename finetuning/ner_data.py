"""NER data: token-per-line reader/writer, tag schemes, first-subword encoding with overlapping windows.

Files: ``token<TAB>label`` or whitespace-separated CoNLL columns (label last), blank line between sentences,
``-DOCSTART-`` lines kept in place, CRLF tolerated. Tags are checked against the file's scheme (IOB1, IOB2, IOBES) and
converted to IOB2 for training; predictions are written back in the file's own scheme, one label per input token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetuning.metrics import extract_entities

TAG_PATTERN = re.compile(r"^(O|[BIES]-\S+)$")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]  # as in the file
    prefixes: list[str]  # each input line without its label (columns + separator), to write predictions back
    first_line: int  # 1-based line number of the first token
    before: list[str] = field(default_factory=list)  # -DOCSTART- lines preceding this sentence


@dataclass
class NERFile:
    path: str
    sentences: list[Sentence]
    scheme: str  # iob1 | iob2 | iobes
    trailing: list[str] = field(default_factory=list)  # -DOCSTART- lines after the last sentence
    all_labels: list[str] = field(default_factory=list)  # IOB2 label set of the whole file (set by the caller)


def read_conll(path: str | Path, scheme: str = "auto") -> NERFile:
    """Read a token-per-line file; ValueError naming file and line on malformed lines, bad tags or an empty file."""
    path = str(path)
    sentences: list[Sentence] = []
    pending_before: list[str] = []
    cur: Sentence | None = None
    with open(path, encoding="utf-8") as f:  # universal newlines: CRLF files read like LF ones
        for line_no, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if cur is not None:
                    sentences.append(cur)
                    cur = None
                continue
            if line.startswith("-DOCSTART-"):
                if cur is not None:
                    sentences.append(cur)
                    cur = None
                pending_before.append(line)
                continue
            if "\t" in line:
                cut = line.rstrip("\t").rfind("\t")
                prefix, label = line[: cut + 1], line[cut + 1 :].strip()
                token = line.split("\t", 1)[0]
            else:
                cols = line.split()
                cut = line.rstrip().rfind(" ")
                prefix, label, token = line[: cut + 1], cols[-1], cols[0]
            if cut < 0 or not token.strip():
                raise ValueError(f"{path}:{line_no}: expected 'token<TAB>label' (or CoNLL columns), got {line!r}")
            if not TAG_PATTERN.match(label):
                raise ValueError(f"{path}:{line_no}: invalid tag {label!r} (expected O, B-X, I-X, E-X or S-X)")
            if cur is None:
                cur = Sentence([], [], [], line_no, pending_before)
                pending_before = []
            cur.tokens.append(token.strip())
            cur.tags.append(label)
            cur.prefixes.append(prefix)
    if cur is not None:
        sentences.append(cur)
    if not sentences:
        raise ValueError(f"{path}: no sentences (empty file?)")
    detected = detect_scheme([s.tags for s in sentences]) if scheme == "auto" else scheme
    for s in sentences:
        bad = find_invalid_tag(s.tags, detected)
        if bad is not None:
            i, why = bad
            raise ValueError(f"{path}:{s.first_line + i}: {why} (tag scheme {detected})")
    return NERFile(path, sentences, detected, pending_before)


def detect_scheme(all_tags: Sequence[Sequence[str]]) -> str:
    """iobes if E-/S- occur; iob1 if some I-X begins an entity; else iob2."""
    begins_with_i = False
    for tags in all_tags:
        prev = "O"
        for t in tags:
            if t[0] in "ES":
                return "iobes"
            if t[0] == "I" and (prev == "O" or prev[2:] != t[2:]):
                begins_with_i = True
            prev = t
    return "iob1" if begins_with_i else "iob2"


def find_invalid_tag(tags: Sequence[str], scheme: str) -> tuple[int, str] | None:
    """(index, reason) of the first tag that breaks ``scheme``, or None."""
    prev = "O"
    for i, t in enumerate(tags):
        p, typ = t[0], t[2:]
        same = prev != "O" and prev[2:] == typ
        if scheme in ("iob1", "iob2") and p in "ES":
            return i, f"{t} is not an IOB tag"
        if scheme == "iob2" and p == "I" and not (same and prev[0] in "BI"):
            return i, f"{t} after {prev} does not continue an entity"
        if scheme == "iob1" and p == "B" and not (same and prev[0] in "BI"):
            return i, f"{t} after {prev}: IOB1 uses B- only between adjacent entities of one type (mixed IOB1/IOB2?)"
        if scheme == "iobes":
            if p in "IE" and not (same and prev[0] in "BI"):
                return i, f"{t} after {prev} does not continue an entity"
            if prev[0] in "BI" and not (same and p in "IE"):
                return i, f"{prev} before {t} is not closed by E-"
        prev = t
    if scheme == "iobes" and prev[0] in "BI":
        return len(tags) - 1, f"{prev} ends the sentence without E-"
    return None


def encode_tags(chunks: list[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    tags = ["O"] * n
    prev_end, prev_type = -2, ""
    for typ, s, e in chunks:
        for i in range(s, e + 1):
            tags[i] = f"I-{typ}"
        if scheme == "iob2" or (scheme == "iob1" and prev_end == s - 1 and prev_type == typ):
            tags[s] = f"B-{typ}"
        elif scheme == "iobes":
            if s == e:
                tags[s] = f"S-{typ}"
            else:
                tags[s], tags[e] = f"B-{typ}", f"E-{typ}"
        prev_end, prev_type = e, typ
    return tags


def convert_tags(tags: Sequence[str], scheme: str) -> list[str]:
    """Re-encode the entities of a sentence (read with conlleval rules, so any tag sequence works) in ``scheme``."""
    return encode_tags(extract_entities(tags), len(tags), scheme)


def conll_text(ner_file: NERFile, predicted_iob2: Sequence[Sequence[str]]) -> str:
    """Predictions in conlleval's layout: each input line's columns (the token first), then the gold and the predicted
    tag, in the file's own tag scheme, separated by single spaces (conlleval's default delimiter; whitespace inside a
    column becomes "_"); a blank line between sentences; a -DOCSTART- line padded with "O" to the same column count.
    ``perl conlleval.pl < test_predictions.tsv`` scores it as metrics.json does."""
    body, width = [], 0
    for s, pred in zip(ner_file.sentences, predicted_iob2, strict=True):
        if len(pred) != len(s.tokens):
            raise ValueError(f"{ner_file.path}:{s.first_line}: {len(pred)} predictions for {len(s.tokens)} tokens")
        rows = [[*_columns(p), g, t] for p, g, t in zip(s.prefixes, s.tags, convert_tags(pred, ner_file.scheme))]
        width = max(width, *map(len, rows))
        body.append((s.before, rows))
    out = []
    for before, rows in body:
        for line in before:  # CoNLL layout: a document marker is its own block
            cols = _columns(line)
            out.extend([" ".join(cols + ["O"] * (width - len(cols))), ""])
        out.extend(" ".join(r) for r in rows)
        out.append("")
    for line in ner_file.trailing:
        cols = _columns(line)
        out.extend([" ".join(cols + ["O"] * (width - len(cols))), ""])
    return "\n".join(out) + "\n"


def _columns(text: str) -> list[str]:
    """A line's columns (tab- or whitespace-separated, as read), whitespace inside a column made "_"."""
    parts = text.rstrip("\t").split("\t") if "\t" in text else text.split()
    return [re.sub(r"\s+", "_", c.strip()) or "_" for c in parts]


# ---------------------------------------------------------------------------------------------------------- encoding
def plan_windows(piece_counts: Sequence[int], budget: int, overlap: int) -> list[tuple[int, int]]:
    """Word spans [start, end) of at most ``budget`` subwords covering every word; neighbours share ~``overlap``."""
    n = len(piece_counts)
    windows, start = [], 0
    while True:
        end, used = start, 0
        while end < n and used + piece_counts[end] <= budget:
            used += piece_counts[end]
            end += 1
        end = max(end, start + 1)  # pieces per word are capped at budget, so this only guards n == 0
        windows.append((start, end))
        if end >= n:
            return windows
        back, shared = end, 0
        while back > start + 1 and shared + piece_counts[back - 1] <= overlap:
            back -= 1
            shared += piece_counts[back]
        start = back


def assign_words(windows: Sequence[tuple[int, int]], n_words: int) -> list[int]:
    """For each word, the window it is predicted from: the one where it has the most context on its shorter side."""
    best = [-1] * n_words
    score = [-1] * n_words
    for w, (s, e) in enumerate(windows):
        for i in range(s, e):
            ctx = min(i - s, e - 1 - i)
            if ctx > score[i]:
                best[i], score[i] = w, ctx
    return best


@dataclass
class NERFeatures:
    """One model input per window. ``targets`` maps (sentence, word) predictions to (feature, token position)."""

    input_ids: list[list[int]]
    labels: list[list[int]]  # label id at each word's first subword (all words of the window), -100 elsewhere
    targets: list[list[tuple[int, int]]]  # per sentence, per word: (feature index, token position)


def encode_sentences(
    sentences: Sequence[Sequence[str]],
    tags_iob2: Sequence[Sequence[str]] | None,
    tokenizer,
    label2id: dict[str, int],
    max_seq_len: int,
    overlap: int,
) -> NERFeatures:
    budget = max_seq_len - 2
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, add_special_tokens=False)
    cls_id, sep_id, unk_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
    feats = NERFeatures([], [], [])
    for si, words in enumerate(sentences):
        pieces: list[list[int]] = [[] for _ in words]
        for tok_id, wid in zip(enc["input_ids"][si], enc.word_ids(si)):
            if wid is not None:
                pieces[wid].append(tok_id)
        # A token the tokenizer drops entirely (e.g. a zero-width space) still needs a position to be labelled.
        pieces = [(p or [unk_id])[:budget] for p in pieces]
        windows = plan_windows([len(p) for p in pieces], budget, overlap)
        owner = assign_words(windows, len(words))
        targets: list[tuple[int, int]] = [(-1, -1)] * len(words)
        for w, (s, e) in enumerate(windows):
            fi = len(feats.input_ids)
            ids, labels = [cls_id], [-100]
            for wi in range(s, e):
                if owner[wi] == w:
                    targets[wi] = (fi, len(ids))
                labels.append(label2id[tags_iob2[si][wi]] if tags_iob2 is not None else -100)
                labels.extend([-100] * (len(pieces[wi]) - 1))
                ids.extend(pieces[wi])
            ids.append(sep_id)
            labels.append(-100)
            feats.input_ids.append(ids)
            feats.labels.append(labels)
        feats.targets.append(targets)
    return feats


def label_list(files: Sequence[NERFile]) -> list[str]:
    """IOB2 label set of the training data: O first, then B-/I- of each type, sorted."""
    types = sorted({t[2:] for f in files for s in f.sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
