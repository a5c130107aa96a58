"""QA reader, sliding windows, n-best spans, per-question aggregation and the BioASQ converters."""

import json

import numpy as np
import pytest

from finetuning.bioasq import bioasq_to_squad, predictions_to_bioasq
from finetuning.bioasq import cli as bioasq_cli
from finetuning.qa_data import (
    QAExample,
    aggregate_by_question,
    encode_qa,
    gold_by_question,
    holdout_split,
    nbest_spans,
    question_id,
    read_squad,
)


def test_question_ids():
    assert question_id("58edf567eda5a57672000011:5") == "58edf567eda5a57672000011"
    assert question_id("58edf567eda5a57672000011_005") == "58edf567eda5a57672000011"
    assert question_id("plain") == "plain"


def test_reads_real_bioasq(shared_data):
    ex = read_squad(shared_data / "qa/BioASQ/bioasq-factoid-squad-format.json")
    assert len(ex) == 1809 and len({e.qid for e in ex}) == 214
    for e in ex:
        assert e.context[e.answer_starts[0] :].startswith(e.answers[0])
    train, held = holdout_split(ex, 0.2, seed=1)
    assert {e.qid for e in train}.isdisjoint({e.qid for e in held})
    assert len({e.qid for e in held}) == 43 and len(train) + len(held) == len(ex)


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"data": [{"paragraphs": [{"qas": []}]}]}, r"paragraphs\[0\]: missing 'context'"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q1:0", "answers": []}]}]}]},
         r"question q1:0: missing field 'question'"),
        ({"data": [{"paragraphs": [{"context": "abc", "qas": [
            {"id": "q2_1", "question": "?", "answers": [{"text": "zz", "answer_start": 0}]}]}]}]},
         r"question q2_1: answer 'zz' does not occur"),
        ({"data": []}, r"no questions"),
        ({"questions": []}, r"expected SQuAD format"),
    ],
)
def test_bad_json_names_file_and_question(tmp_path, doc, match):
    p = tmp_path / "train.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        read_squad(p)


def test_windows_cover_long_context_and_target_the_answer(tokenizer):
    context = " ".join(f"filler{i}" for i in range(120)) + " the answer is BRCA1 here " + "tail " * 60
    start = context.index("BRCA1")
    ex = QAExample("q:0", "q", "Which gene?", context, ["BRCA1"], [start])
    feats = encode_qa([ex], tokenizer, max_seq_len=64, doc_stride=16, max_query_len=16)
    assert len(feats["input_ids"]) > 5 and all(len(x) <= 64 for x in feats["input_ids"])
    hits = [i for i, s in enumerate(feats["start_positions"]) if s > 0]
    assert hits  # at least one window holds the answer; the others point at [CLS]
    for i in hits:
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        off = feats["offsets"][i]
        assert context[off[s][0] : off[e][1]] == "BRCA1"
    # Every context character is inside some window.
    covered = set()
    for off in feats["offsets"]:
        for o in off:
            if o is not None:
                covered.update(range(*o))
    assert all(i in covered for i, ch in enumerate(context) if not ch.isspace())


def test_nbest_and_aggregation_across_snippets(tokenizer):
    exs = [QAExample("q:0", "q", "Which?", "alpha beta gamma", ["beta"], [6]),
           QAExample("q:1", "q", "Which?", "Beta delta", ["Beta"], [0])]
    feats = encode_qa(exs, tokenizer, 32, 8, 8)
    starts, ends = [], []
    for off in feats["offsets"]:
        s, e = np.full(len(off), -10.0), np.full(len(off), -10.0)
        ctx = [i for i, o in enumerate(off) if o is not None]
        s[ctx[1]], e[ctx[1]] = 5.0, 5.0  # second context token: "beta" in snippet 0, "delta" in snippet 1
        s[ctx[0]], e[ctx[0]] = 4.0, 4.0
        starts.append(s)
        ends.append(e)
    nbest = nbest_spans(exs, feats, starts, ends, n_best=5, max_answer_len=5)
    assert nbest[0][0]["text"] == "beta" and nbest[1][0]["text"] == "delta"
    assert abs(sum(x["probability"] for x in nbest[0]) - 1) < 1e-6
    ranked = aggregate_by_question(exs, nbest, top_k=5)
    assert ranked["q"][:2] in (["beta", "delta"], ["delta", "beta"])
    assert [a.lower() for a in ranked["q"]].count("beta") == 1  # "Beta" and "beta" merged
    assert gold_by_question(exs) == {"q": {"beta", "Beta"}}


def test_bioasq_converters(tmp_path):
    official = {"questions": [
        {"id": "q1", "type": "factoid", "body": "Which gene?", "exact_answer": [["BRCA1", "breast cancer 1"]],
         "snippets": [{"text": "Mutations in brca1 matter."}, {"text": "No answer here."}]},
        {"id": "q2", "type": "yesno", "body": "Is it?", "snippets": [{"text": "yes"}]},
    ]}
    squad = bioasq_to_squad(official)
    (para,) = squad["data"][0]["paragraphs"]
    assert para["qas"][0]["id"] == "q1_000" and para["qas"][0]["answers"] == [{"text": "brca1", "answer_start": 13}]
    assert len(bioasq_to_squad(official, keep_unanswered=True)["data"][0]["paragraphs"]) == 2
    src, out = tmp_path / "in.json", tmp_path / "squad.json"
    src.write_text(json.dumps(official))
    bioasq_cli(["to-squad", str(src), str(out)])
    (ex,) = read_squad(out)
    assert ex.qid == "q1" and ex.answers == ["brca1"]
    with pytest.raises(ValueError, match=r"question q3: missing field 'snippets'"):
        bioasq_to_squad({"questions": [{"id": "q3", "body": "?"}]})
    sub = predictions_to_bioasq({"q1": ["a", "b", "c", "d", "e", "f"]})
    assert sub["questions"][0]["exact_answer"] == [["a"], ["b"], ["c"], ["d"], ["e"]]
