"""BioASQ format converters.

  biobert bioasq to-squad BIOASQ.json OUT.json [--keep-unanswered]
      official BioASQ JSON ({"questions": [{"id", "body", "type", "snippets": [{"text"}], "exact_answer"}]}) ->
      SQuAD v1 training/test data, one paragraph per snippet, ids QUESTIONID_N (factoid questions only).
  biobert bioasq to-submission PREDICTIONS.json OUT.json
      our {question id: [ranked answers]} predictions -> the BioASQ factoid submission format.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from biobert.config import option, parse
from biobert.errors import UserError, run
from biobert.files import atomic_write_json


def _synonyms(exact_answer) -> list[str]:
    """exact_answer is a list of strings or a list of synonym lists; flatten to all acceptable strings."""
    out = []
    for item in exact_answer if isinstance(exact_answer, list) else [exact_answer]:
        out.extend(item if isinstance(item, list) else [item])
    return [str(s) for s in out if str(s).strip()]


def bioasq_to_squad(doc: dict, source: str = "<input>", keep_unanswered: bool = False) -> dict:
    """Factoid questions -> SQuAD v1. A snippet becomes a training example when a gold synonym occurs in it
    (case-insensitive); others are dropped unless ``keep_unanswered`` (test data: no answers at all)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise ValueError(f"{source}: expected {{'questions': [...]}} (official BioASQ JSON)")
    paragraphs = []
    for qi, q in enumerate(doc["questions"]):
        qid = q.get("id") if isinstance(q, dict) else None
        where = f"{source}: question {qid}" if qid else f"{source}: questions[{qi}]"
        if qid is None:
            raise ValueError(f"{where}: missing field 'id'")
        if q.get("type", "factoid") != "factoid":
            continue
        for key in ("body", "snippets"):
            if key not in q:
                raise ValueError(f"{where}: missing field '{key}'")
        answers = _synonyms(q.get("exact_answer", []))
        for n, snip in enumerate(q["snippets"]):
            if "text" not in snip:
                raise ValueError(f"{where}: snippets[{n}] has no 'text'")
            context = snip["text"]
            found = []
            for a in answers:
                pos = context.lower().find(a.lower())
                if pos >= 0:
                    found.append({"text": context[pos : pos + len(a)], "answer_start": pos})
            if not found and not keep_unanswered:
                continue
            qa = {"id": f"{qid}_{n:03d}", "question": q["body"], "answers": found[:1]}
            paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "BioASQ-factoid", "data": [{"title": "BioASQ", "paragraphs": paragraphs}]}


def predictions_to_bioasq(ranked: dict[str, list[str]], top_k: int = 5) -> dict:
    """{question id: [answers best first]} -> {"questions": [{"id", "type", "exact_answer": [[a1], [a2], ...]}]}."""
    return {
        "questions": [
            {"id": qid, "type": "factoid", "exact_answer": [[a] for a in answers[:top_k]], "ideal_answer": ""}
            for qid, answers in ranked.items()
        ]
    }


@dataclass(kw_only=True)
class BioasqConfig:
    """Convert BioASQ JSON <-> SQuAD / submissions."""

    direction: str = option(help="to-squad or to-submission", choices=("to-squad", "to-submission"), positional=True)
    input: str = option(help="BioASQ JSON (to-squad) or our predictions JSON (to-submission)", positional=True)
    output: str = option(help="the JSON to write", positional=True)
    keep_unanswered: bool = option(False, "to-squad: keep snippets without a gold answer (test data)")


def main(cfg: BioasqConfig) -> dict:
    try:
        with open(cfg.input, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg.input}:{e.lineno}: not valid JSON ({e.msg})") from None
    if cfg.direction == "to-squad":
        out = bioasq_to_squad(doc, cfg.input, cfg.keep_unanswered)
        print(f"{len(out['data'][0]['paragraphs'])} snippets -> {cfg.output}")
    else:
        if not isinstance(doc, dict):
            raise UserError(f"{cfg.input}: expected {{question id: [answers]}}")
        out = predictions_to_bioasq(doc)
    atomic_write_json(cfg.output, out)
    return out


def cli(argv: list[str] | None = None) -> int:
    main(parse(BioasqConfig, argv, prog="biobert bioasq", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
