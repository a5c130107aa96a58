"""BioASQ factoid QA in SQuAD v1 format: reader, sliding-window features, n-best spans, per-question aggregation.

As BioBERT preprocessed BioASQ, each paragraph is one snippet and each question id is ``QUESTIONID_N`` or
``QUESTIONID:N`` (snippet N of question QUESTIONID); the answers of all snippets of a question are pooled.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SNIPPET_ID = re.compile(r"^(.+)[:_](\d+)$")


@dataclass
class QAExample:
    id: str  # snippet-level id as in the file
    qid: str  # question id shared by its snippets
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


def question_id(example_id: str) -> str:
    m = _SNIPPET_ID.match(example_id)
    return m.group(1) if m else example_id


def read_squad(path: str | Path) -> list[QAExample]:
    """SQuAD v1 JSON -> examples; ValueError naming the file and the question id (or paragraph) on missing fields."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: expected SQuAD format {{'data': [{{'paragraphs': [...]}}]}}")
    out = []
    for ai, article in enumerate(doc["data"]):
        for pi, para in enumerate(article.get("paragraphs", [])) if isinstance(article, dict) else []:
            where = f"{path}: data[{ai}].paragraphs[{pi}]"
            if "context" not in para or "qas" not in para:
                raise ValueError(f"{where}: missing 'context' or 'qas'")
            context = para["context"]
            for qa in para["qas"]:
                if "id" not in qa:
                    raise ValueError(f"{where}: a question has no 'id'")
                qwhere = f"{path}: question {qa['id']}"
                for key in ("question", "answers"):
                    if key not in qa:
                        raise ValueError(f"{qwhere}: missing field '{key}'")
                texts, starts = [], []
                for a in qa["answers"]:
                    if "text" not in a or "answer_start" not in a:
                        raise ValueError(f"{qwhere}: an answer lacks 'text' or 'answer_start'")
                    start = int(a["answer_start"])
                    if context[start : start + len(a["text"])] != a["text"]:
                        # Some converters shift offsets; find the answer text rather than train on a wrong span.
                        found = context.lower().find(a["text"].lower())
                        if found < 0:
                            raise ValueError(f"{qwhere}: answer {a['text']!r} does not occur in its context")
                        start = found
                    texts.append(a["text"])
                    starts.append(start)
                out.append(QAExample(str(qa["id"]), question_id(str(qa["id"])), qa["question"], context, texts, starts))
    if not out:
        raise ValueError(f"{path}: no questions (empty file?)")
    return out


def holdout_split(examples: Sequence[QAExample], fraction: float, seed: int) -> tuple[list, list]:
    """Split by question (never a question's snippets on both sides): (train, held out)."""
    qids = sorted({e.qid for e in examples})
    random.Random(seed).shuffle(qids)
    held = set(qids[: max(1, round(len(qids) * fraction))])
    return [e for e in examples if e.qid not in held], [e for e in examples if e.qid in held]


def _truncate_question(tokenizer, question: str, max_query_len: int) -> str:
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_len:
        return question
    return question[: enc["offset_mapping"][max_query_len - 1][1]]


def encode_qa(examples: Sequence[QAExample], tokenizer, max_seq_len: int, doc_stride: int, max_query_len: int) -> dict:
    """Windows over each context (``doc_stride`` tokens shared by neighbours, as in HF's run_qa), with the answer's
    token span as target, or [CLS] (0, 0) when a window does not contain it."""
    questions = [_truncate_question(tokenizer, e.question, max_query_len) for e in examples]
    enc = tokenizer(
        questions,
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    feats = {"input_ids": [], "token_type_ids": [], "start_positions": [], "end_positions": [], "example": []}
    feats["offsets"] = []
    for fi, ex_i in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[ex_i]
        seq_ids = enc.sequence_ids(fi)
        offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][fi], seq_ids)]
        start_tok = end_tok = 0
        if ex.answers:
            a_s = ex.answer_starts[0]
            a_e = a_s + len(ex.answers[0])
            ctx = [i for i, o in enumerate(offsets) if o is not None]
            if ctx and offsets[ctx[0]][0] <= a_s and offsets[ctx[-1]][1] >= a_e:
                start_tok = next(i for i in ctx if offsets[i][1] > a_s)
                end_tok = next(i for i in reversed(ctx) if offsets[i][0] < a_e)
        feats["input_ids"].append(enc["input_ids"][fi])
        feats["token_type_ids"].append(enc["token_type_ids"][fi])
        feats["start_positions"].append(start_tok)
        feats["end_positions"].append(end_tok)
        feats["example"].append(ex_i)
        feats["offsets"].append(offsets)
    return feats


def nbest_spans(
    examples: Sequence[QAExample],
    feats: dict,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best: int,
    max_answer_len: int,
) -> list[list[dict]]:
    """Per example, up to n_best {text, score, probability} spans over all its windows, best first."""
    cands: list[list[tuple[float, int, int]]] = [[] for _ in examples]
    for fi, ex_i in enumerate(feats["example"]):
        offsets = feats["offsets"][fi]
        s_log, e_log = np.asarray(start_logits[fi]), np.asarray(end_logits[fi])
        n = min(len(offsets), len(s_log))
        s_top = np.argsort(s_log[:n])[::-1][:n_best]
        e_top = np.argsort(e_log[:n])[::-1][:n_best]
        for s in s_top:
            if offsets[s] is None:
                continue
            for e in e_top:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                cands[ex_i].append((float(s_log[s] + e_log[e]), offsets[s][0], offsets[e][1]))
    out = []
    for ex, spans in zip(examples, cands):
        best: dict[str, float] = {}
        for score, cs, ce in sorted(spans, reverse=True):
            text = ex.context[cs:ce].strip()
            if text and text not in best:
                best[text] = score
            if len(best) >= n_best:
                break
        if not best:
            out.append([])
            continue
        top = max(best.values())
        z = sum(math.exp(v - top) for v in best.values())
        out.append([{"text": t, "score": v, "probability": math.exp(v - top) / z} for t, v in best.items()])
    return out


def aggregate_by_question(examples: Sequence[QAExample], nbest: Sequence[list[dict]], top_k: int) -> dict:
    """qid -> up to top_k answers ranked by their best snippet probability (case-insensitive duplicates merged)."""
    pooled: dict[str, dict[str, tuple[float, str]]] = {}
    for ex, spans in zip(examples, nbest):
        q = pooled.setdefault(ex.qid, {})
        for span in spans:
            key = span["text"].lower()
            if key not in q or span["probability"] > q[key][0]:
                q[key] = (span["probability"], span["text"])
    return {qid: [t for _, t in sorted(q.values(), key=lambda x: -x[0])[:top_k]] for qid, q in pooled.items()}


def gold_by_question(examples: Sequence[QAExample]) -> dict[str, set[str]]:
    gold: dict[str, set[str]] = {}
    for ex in examples:
        if ex.answers:
            gold.setdefault(ex.qid, set()).update(ex.answers)
    return gold
