"""BioASQ format converters.

  python finetuning/bioasq.py to-squad BIOASQ.json OUT.json [--keep-unanswered]
      official BioASQ JSON ({"questions": [{"id", "body", "type", "snippets": [{"text"}], "exact_answer"}]}) ->
      SQuAD v1 training/test data, one paragraph per snippet, ids QUESTIONID_N (factoid questions only).
  python finetuning/bioasq.py to-submission PREDICTIONS.json OUT.json
      our {question id: [ranked answers]} predictions -> the BioASQ factoid submission format.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # finetuning/ on sys.path would shadow the stdlib `re` with finetuning/re.py
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json


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


def main(argv: list[str] | None = None) -> None:
    from finetuning.common import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    to_squad = sub.add_parser("to-squad")
    to_squad.add_argument("input")
    to_squad.add_argument("output")
    to_squad.add_argument("--keep-unanswered", action="store_true")
    to_sub = sub.add_parser("to-submission")
    to_sub.add_argument("input")
    to_sub.add_argument("output")
    args = parser.parse_args(argv)
    try:
        with open(args.input, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{args.input}:{e.lineno}: not valid JSON ({e.msg})") from None
    if args.cmd == "to-squad":
        out = bioasq_to_squad(doc, args.input, args.keep_unanswered)
        print(f"{len(out['data'][0]['paragraphs'])} snippets -> {args.output}")
    else:
        if not isinstance(doc, dict):
            raise SystemExit(f"{args.input}: expected {{question id: [answers]}}")
        out = predictions_to_bioasq(doc)
    write_json(args.output, out)


if __name__ == "__main__":
    main()
