"""Relation-extraction data: BioBERT TSV and marker JSONL readers, label sets, stratified k-fold CV.

TSV (BioBERT): ``sentence<TAB>label`` or ``index<TAB>sentence<TAB>label``, entities anonymised as @GENE$, @DISEASE$,
@CHEMICAL$, optional header line. JSONL (SciBERT ChemProt): ``{"text": "... << protein >> ... [[ chemical ]] ...",
"label": "INHIBITOR"}``. Entity markers stay in the text: the model sees them as ordinary tokens, as in both papers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class REExample:
    text: str
    label: str
    line: int  # 1-based line number in its file (for errors and predictions)
    guid: str = ""


def read_re_file(path: str | Path) -> list[REExample]:
    path = str(path)
    if path.endswith((".jsonl", ".json")):
        examples = _read_jsonl(path)
    else:
        examples = _read_tsv(path)
    if not examples:
        raise ValueError(f"{path}: no examples (empty file?)")
    return examples


def _read_tsv(path: str) -> list[REExample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if line_no == 1 and {c.strip().lower() for c in cols} >= {"sentence", "label"}:
                continue  # header
            if len(cols) == 2:
                guid, text, label = str(line_no), cols[0], cols[1]
            elif len(cols) == 3:
                guid, text, label = cols
            else:
                raise ValueError(
                    f"{path}:{line_no}: expected 'sentence<TAB>label' or 'index<TAB>sentence<TAB>label', "
                    f"got {len(cols)} tab-separated columns"
                )
            if not text.strip() or not label.strip():
                raise ValueError(f"{path}:{line_no}: empty sentence or label")
            out.append(REExample(text.strip(), label.strip(), line_no, guid.strip()))
    return out


def _read_jsonl(path: str) -> list[REExample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            missing = [k for k in ("text", "label") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
            text, label = str(rec["text"]), str(rec["label"])
            if not text.strip():
                raise ValueError(f"{path}:{line_no}: empty text")
            out.append(REExample(text, label, line_no, str(rec.get("id", line_no))))
    return out


def label_set(train: Sequence[REExample]) -> list[str]:
    return sorted({e.label for e in train})


def check_labels(examples: Sequence[REExample], labels: Sequence[str], path: str | Path) -> None:
    """Clear error on a label the training data never had (the classifier has no output for it)."""
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise ValueError(
                f"{path}:{e.line}: label {e.label!r} does not occur in the training data (known: {sorted(known)})"
            )


def default_negative(labels: Sequence[str]) -> str | None:
    """The class excluded from micro P/R/F: "0" for 0/1 tasks, "false" for BioBERT's ChemProt TSV, else none."""
    if set(labels) <= {"0", "1"}:
        return "0"
    for neg in ("false", "False", "NA", "negative"):
        if neg in labels:
            return neg
    return None


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[int]:
    """Fold index of every example: each class shuffled (seeded) and dealt round-robin, so folds keep class ratios
    and sizes differ by at most one."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if len(labels) < k:
        raise ValueError(f"{len(labels)} examples cannot make {k} folds")
    rng = random.Random(seed)
    fold = [-1] * len(labels)
    next_fold = 0
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(idx)
        for i in idx:
            fold[i] = next_fold
            next_fold = (next_fold + 1) % k
    return fold


def to_tsv(examples: Sequence[REExample]) -> str:
    """BioBERT TSV text (sentence<TAB>label), e.g. for the fold files of a CV run."""
    return "".join(f"{e.text}\t{e.label}\n" for e in examples)
