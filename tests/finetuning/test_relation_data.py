"""RE readers (BioBERT TSV, marker JSONL), label checks, and stratified CV fold assignment."""

import collections
import json

import pytest

from finetuning.relation_data import check_labels, default_negative, label_set, read_re_file, stratified_folds, to_tsv


def test_tsv_plain_header_and_index_column(tmp_path):
    plain = tmp_path / "train.tsv"
    plain.write_text("@GENE$ causes @DISEASE$ .\t1\r\nno link of @GENE$ with @DISEASE$\t0\r\n\r\n")
    ex = read_re_file(plain)
    assert [(e.text, e.label, e.line) for e in ex] == [
        ("@GENE$ causes @DISEASE$ .", "1", 1), ("no link of @GENE$ with @DISEASE$", "0", 2)]
    indexed = tmp_path / "test.tsv"
    indexed.write_text("index\tsentence\tlabel\n7\t@CHEMICAL$ inhibits @GENE$\tCPR:4\n8\tx @GENE$\tfalse\n")
    ex = read_re_file(indexed)
    assert [(e.guid, e.label, e.line) for e in ex] == [("7", "CPR:4", 2), ("8", "false", 3)]
    assert to_tsv(ex) == "@CHEMICAL$ inhibits @GENE$\tCPR:4\nx @GENE$\tfalse\n"


def test_jsonl_markers(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"text": "<< EGFR >> is inhibited by [[ gefitinib ]]", "label": "INHIBITOR"}) + "\n")
    (e,) = read_re_file(p)
    assert e.text.startswith("<< EGFR >>") and e.label == "INHIBITOR" and e.line == 1


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("train.tsv", "a\tb\tc\td\n", r"train.tsv:1: expected 'sentence<TAB>label'"),
        ("train.tsv", "ok\t1\nno label here\n", r"train.tsv:2: expected"),
        ("train.tsv", "", r"train.tsv: no examples"),
        ("train.jsonl", '{"text": "x", "label": "A"}\n{"text": "y"}\n', r"train.jsonl:2: missing field\(s\) label"),
        ("train.jsonl", '{"text": "x", "label": "A"}\n{not json\n', r"train.jsonl:2: not valid JSON"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_re_file(p)


def test_unseen_test_label_is_a_clear_error(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("s1\tCPR:3\ns2\tCPR:9\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: label 'CPR:9' does not occur in the training data"):
        check_labels(read_re_file(p), ["CPR:3", "false"], p)


def test_negative_class_defaults():
    assert default_negative(["0", "1"]) == "0"
    assert default_negative(["CPR:3", "CPR:4", "false"]) == "false"
    assert default_negative(["INHIBITOR", "AGONIST"]) is None


def test_stratified_folds_balanced_seeded_and_partitioning():
    labels = ["1"] * 53 + ["0"] * 47 + ["x"] * 7
    folds = stratified_folds(labels, 10, seed=3)
    assert folds == stratified_folds(labels, 10, seed=3) and folds != stratified_folds(labels, 10, seed=4)
    sizes = collections.Counter(folds)
    assert sorted(sizes) == list(range(10)) and max(sizes.values()) - min(sizes.values()) <= 1
    for label, n in collections.Counter(labels).items():
        per_fold = collections.Counter(f for f, lab in zip(folds, labels) if lab == label)
        assert max(per_fold.values()) - min(per_fold.get(k, 0) for k in range(10)) <= 1, label
        assert sum(per_fold.values()) == n
    with pytest.raises(ValueError):
        stratified_folds(["a"] * 3, 10, 0)


def test_reads_real_gad_and_chemprot(shared_data):
    gad = read_re_file(shared_data / "re/GAD/train.tsv")
    assert len(gad) == 4796 and label_set(gad) == ["0", "1"]
    assert all("@GENE$" in e.text and "@DISEASE$" in e.text for e in gad[:100])
    train = read_re_file(shared_data / "re/ChemProt/train.jsonl")
    dev = read_re_file(shared_data / "re/ChemProt/dev.jsonl")
    labels = label_set(train)
    assert len(train) == 4169 and len(labels) == 13 and "INHIBITOR" in labels
    check_labels(dev, labels, "dev.jsonl")
    assert all("<<" in e.text and "[[" in e.text for e in train[:100])
