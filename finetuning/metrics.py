"""Evaluation measures with the semantics the BioBERT paper reports.

NER: entity-level P/R/F1 exactly as conlleval.pl computes them (chunks are read with conlleval's start/end rules, so an
``I-X`` after ``O`` starts an entity and a type change ends one); seqeval's default mode uses the same rules.
RE: P/R/F1 of the positive class (binary) or micro P/R/F1 over the relation classes, excluding the negative class.
QA: BioASQ factoid strict/lenient accuracy and MRR over the top 5, and SQuAD v1 EM/F1.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


# ----------------------------------------------------------------------------------------------------------------- NER
def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, _, etype = tag.partition("-")
    return prefix, etype


def _ends(prev: str, prev_type: str, tag: str, etype: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != etype


def _starts(prev: str, prev_type: str, tag: str, etype: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev in ("O", "E", "S"):
        return True
    return tag != "O" and prev_type != etype


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end_inclusive) chunks of one sentence, read with conlleval's rules (IOB1, IOB2 and IOBES)."""
    chunks = []
    prev, prev_type, start = "O", "", None
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentence end closes any open chunk
        cur, etype = _split_tag(tag)
        if start is not None and _ends(prev, prev_type, cur, etype):
            chunks.append((prev_type, start, i - 1))
            start = None
        if _starts(prev, prev_type, cur, etype):
            start = i
        prev, prev_type = cur, etype
    return chunks


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """conlleval entity P/R/F1 (micro over all types) plus ``per_type`` {type: {precision, recall, f1, support}}."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    tp: collections.Counter = collections.Counter()
    n_gold: collections.Counter = collections.Counter()
    n_pred: collections.Counter = collections.Counter()
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        g_chunks, p_chunks = set(extract_entities(g)), set(extract_entities(p))
        n_gold.update(c[0] for c in g_chunks)
        n_pred.update(c[0] for c in p_chunks)
        tp.update(c[0] for c in g_chunks & p_chunks)
    out = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    out["per_type"] = {
        t: {**_prf(tp[t], n_pred[t], n_gold[t]), "support": n_gold[t]} for t in sorted(set(n_gold) | set(n_pred))
    }
    out["n_gold_entities"] = sum(n_gold.values())
    out["n_pred_entities"] = sum(n_pred.values())
    return out


# ------------------------------------------------------------------------------------------------------------------ RE
def classification_scores(gold: Sequence[str], pred: Sequence[str], negative_label: str | None) -> dict:
    """Micro P/R/F1 over every class except ``negative_label``.

    For a binary task with negative "0" this is exactly P/R/F1 of the positive class; for ChemProt it is the
    paper's micro average over the CPR classes. With no negative class it reduces to accuracy.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predicted")
    tp = sum(g == p and g != negative_label for g, p in zip(gold, pred))
    n_pred = sum(p != negative_label for p in pred)
    n_gold = sum(g != negative_label for g in gold)
    out = _prf(tp, n_pred, n_gold)
    out["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0
    labels = sorted((set(gold) | set(pred)) - {negative_label})
    out["per_class"] = {
        c: {
            **_prf(
                sum(g == p == c for g, p in zip(gold, pred)),
                sum(p == c for p in pred),
                sum(g == c for g in gold),
            ),
            "support": sum(g == c for g in gold),
        }
        for c in labels
    }
    return out


# ------------------------------------------------------------------------------------------------------------------ QA
def normalize_answer(s: str) -> str:
    """SQuAD v1 normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact(pred: str, golds: Iterable[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in golds))


def squad_f1(pred: str, golds: Iterable[str]) -> float:
    def f1(a: str, b: str) -> float:
        pa, ga = normalize_answer(a).split(), normalize_answer(b).split()
        common = collections.Counter(pa) & collections.Counter(ga)
        same = sum(common.values())
        if same == 0:
            return 0.0
        p, r = same / len(pa), same / len(ga)
        return 2 * p * r / (p + r)

    return max((f1(pred, g) for g in golds), default=0.0)


def bioasq_factoid_scores(ranked: dict[str, Sequence[str]], gold: dict[str, Iterable[str]], top_k: int = 5) -> dict:
    """Strict accuracy (top-1 correct), lenient accuracy (any of top k correct) and MRR over the top k.

    Matching is case-insensitive exact string match against any gold synonym, as in the BioASQ evaluation.
    Questions without a prediction count as wrong.
    """
    if not gold:
        raise ValueError("no gold questions to score")
    strict = lenient = rr = 0.0
    for qid, answers in gold.items():
        golds = {a.strip().lower() for a in answers}
        preds = [p.strip().lower() for p in ranked.get(qid, [])][:top_k]
        rank = next((i + 1 for i, p in enumerate(preds) if p in golds), None)
        if rank is not None:
            strict += rank == 1
            lenient += 1
            rr += 1.0 / rank
    n = len(gold)
    return {"strict_accuracy": strict / n, "lenient_accuracy": lenient / n, "mrr": rr / n, "n_questions": n}
