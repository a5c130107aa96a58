"""Metric functions against hand-worked cases (conlleval edge cases included) and against seqeval."""

import random

import pytest

from finetuning.metrics import (
    bioasq_factoid_scores,
    classification_scores,
    extract_entities,
    ner_scores,
    normalize_answer,
    squad_exact,
    squad_f1,
)


@pytest.mark.parametrize(
    "tags, chunks",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),  # I- after O starts an entity (conlleval, IOB1)
        (["I-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),  # a type change ends one and starts another
        (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
        (["O", "B-X", "I-X"], [("X", 1, 2)]),  # the sentence end closes the entity
        (["B-X", "E-X", "S-X", "O"], [("X", 0, 1), ("X", 2, 2)]),  # IOBES
        (["O", "E-X", "O"], [("X", 1, 1)]),  # conlleval: E after O starts (and ends) an entity
        (["B-X", "I-X", "E-X", "B-X", "E-X"], [("X", 0, 2), ("X", 3, 4)]),
        (["I-X", "B-X", "I-X"], [("X", 0, 0), ("X", 1, 2)]),  # IOB1: B- separates adjacent same-type entities
        ([], []),
    ],
)
def test_extract_entities_conlleval_rules(tags, chunks):
    assert extract_entities(tags) == chunks


def test_ner_scores_hand_worked():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    s = ner_scores(gold, pred)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    assert s["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_ner_scores_partial_and_type_errors():
    gold = [["B-D", "I-D", "I-D", "O", "B-C", "O", "B-D"]]
    pred = [["B-D", "I-D", "O", "O", "B-D", "O", "I-D"]]  # boundary wrong, type wrong, I- start right
    s = ner_scores(gold, pred)
    # gold: D(0,2) C(4) D(6); pred: D(0,1) D(4) D(6) -> 1 tp of 3 / 3
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["per_type"]["C"]["recall"] == 0.0 and s["per_type"]["D"]["precision"] == pytest.approx(1 / 3)
    assert s["n_gold_entities"] == 3 and s["n_pred_entities"] == 3


def test_entities_do_not_cross_sentences():
    s = ner_scores([["O", "B-X"], ["I-X", "O"]], [["O", "B-X"], ["B-X", "O"]])
    assert s["f1"] == 1.0 and s["n_gold_entities"] == 2  # the I-X of sentence 2 starts its own entity


def test_ner_scores_no_entities_and_length_mismatch():
    assert ner_scores([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        ner_scores([["O", "O"]], [["O"]])


def test_ner_scores_match_seqeval_on_random_iob():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-A", "I-A", "B-B", "I-B"]
    for _ in range(30):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(8)]
        pred = [[rng.choice(tags) for _ in g] for g in gold]
        ours = ner_scores(gold, pred)
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred))


def test_binary_scores_are_positive_class():
    gold = ["1", "1", "0", "0", "1"]
    pred = ["1", "0", "1", "0", "1"]
    s = classification_scores(gold, pred, negative_label="0")
    # tp=2, predicted positive=3, gold positive=3
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(3 / 5)


def test_multiclass_micro_excludes_negative():
    gold = ["CPR:3", "CPR:4", "false", "false", "CPR:4"]
    pred = ["CPR:3", "CPR:3", "CPR:4", "false", "false"]
    s = classification_scores(gold, pred, negative_label="false")
    # tp=1 (CPR:3); predicted non-negative=3; gold non-negative=3
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert set(s["per_class"]) == {"CPR:3", "CPR:4"}
    assert s["per_class"]["CPR:4"]["support"] == 2
    # Without a negative class micro P = R = F = accuracy.
    s = classification_scores(["a", "b", "c"], ["a", "b", "a"], negative_label=None)
    assert s["f1"] == pytest.approx(2 / 3) == s["accuracy"]


def test_bioasq_factoid_scores_hand_worked():
    gold = {"q1": ["BRCA1"], "q2": ["tp53", "p53"], "q3": ["x"], "q4": ["y"]}
    ranked = {"q1": ["brca1", "a"], "q2": ["a", "b", "P53"], "q3": ["a", "b", "c", "d", "e", "x"]}
    s = bioasq_factoid_scores(ranked, gold)
    assert s["strict_accuracy"] == 0.25  # q1 only
    assert s["lenient_accuracy"] == 0.5  # q1, q2 (q3's answer is 6th: outside the top 5; q4 unanswered)
    assert s["mrr"] == pytest.approx((1 + 1 / 3) / 4)


def test_squad_em_f1():
    assert normalize_answer("The  BRCA-1 gene.") == "brca1 gene"
    assert squad_exact("the BRCA1 gene", ["BRCA1 gene"]) == 1.0
    assert squad_f1("BRCA1 mutation carriers", ["BRCA1 carriers"]) == pytest.approx(0.8)
    assert squad_f1("nothing", ["BRCA1"]) == 0.0
