"""NER readers/writers, tag schemes, bad input, and window splitting that labels every token."""

import pytest

from finetuning.ner_data import (
    assign_words,
    conll_text,
    convert_tags,
    detect_scheme,
    encode_sentences,
    label_list,
    plan_windows,
    read_conll,
)


def write(tmp_path, text, name="train.tsv", newline="\n"):
    p = tmp_path / name
    p.write_bytes(text.replace("\n", newline).encode())
    return p


def test_reads_tab_format_with_crlf_docstart_and_blank_lines(tmp_path):
    p = write(tmp_path, "-DOCSTART-\tO\n\nAPC2\tB-Gene\n,\tO\n\n\nbreast\tB-Disease\ncancer\tI-Disease\n", newline="\r\n")
    f = read_conll(p)
    assert [s.tokens for s in f.sentences] == [["APC2", ","], ["breast", "cancer"]]
    assert f.sentences[1].tags == ["B-Disease", "I-Disease"] and f.scheme == "iob2"
    assert f.sentences[0].before == ["-DOCSTART-\tO"] and f.sentences[1].first_line == 7
    out = conll_text(f, [["O", "B-Disease"], ["B-Disease", "O"]])  # token gold pred, conlleval's layout
    assert out == "-DOCSTART- O O\n\nAPC2 B-Gene O\n, O B-Disease\n\nbreast B-Disease B-Disease\ncancer I-Disease O\n\n"


def test_reads_space_separated_conll_label_last_and_writes_back_same_columns(tmp_path):
    p = write(tmp_path, "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n")
    f = read_conll(p)
    assert f.scheme == "iob1" and f.sentences[0].tokens == ["EU", "rejects", "German"]
    out = conll_text(f, [["B-ORG", "O", "B-MISC"]])  # predictions are IOB2; written back as IOB1
    assert out.splitlines()[0] == "-DOCSTART- -X- -X- O O"
    assert out.splitlines()[2:5] == ["EU NNP B-NP I-ORG I-ORG", "rejects VBZ B-VP O O", "German JJ B-NP I-MISC I-MISC"]


def test_iobes_detected_converted_and_written_back(tmp_path):
    p = write(tmp_path, "a\tB-X\nb\tE-X\nc\tS-Y\nd\tO\n")
    f = read_conll(p)
    assert f.scheme == "iobes"
    assert convert_tags(f.sentences[0].tags, "iob2") == ["B-X", "I-X", "B-Y", "O"]
    assert [line.split(" ")[2] for line in conll_text(f, [["B-X", "I-X", "B-Y", "O"]]).split("\n")[:4]] == [
        "B-X", "E-X", "S-Y", "O"]
    assert label_list([f]) == ["O", "B-X", "I-X", "B-Y", "I-Y"]


@pytest.mark.parametrize(
    "text, scheme, match",
    [
        ("a\tB-X\nb\nc\tO\n", "auto", r"train.tsv:2: expected"),
        ("a\tB-X\nb\tX-Y\n", "auto", r"train.tsv:2: invalid tag 'X-Y'"),
        ("a\tO\nb\tI-X\n", "iob2", r"train.tsv:2: I-X after O"),
        ("a\tI-X\nb\tO\nc\tB-X\n", "auto", r"train.tsv:3: B-X after O.*mixed"),
        ("\n\n-DOCSTART-\tO\n", "auto", r"train.tsv: no sentences"),
        ("a\tB-X\nb\tO\n", "iobes", r"train.tsv:2: B-X before O"),
        ("a\tS-X\n\nb\tB-X\n", "auto", r"train.tsv:3: B-X ends the sentence"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, text, scheme, match):
    with pytest.raises(ValueError, match=match):
        read_conll(write(tmp_path, text), scheme)


def test_detect_scheme():
    assert detect_scheme([["B-X", "I-X", "O"]]) == "iob2"
    assert detect_scheme([["I-X", "O"]]) == "iob1"
    assert detect_scheme([["S-X"]]) == "iobes"


def test_plan_windows_cover_and_overlap():
    counts = [3, 1, 2, 5, 1, 1, 4, 2, 2, 1]
    windows = plan_windows(counts, budget=8, overlap=3)
    assert windows[0][0] == 0 and windows[-1][1] == len(counts)
    for (s1, e1), (s2, e2) in zip(windows, windows[1:]):
        assert s1 < s2 <= e1 and e2 > e1  # moving forward, overlapping or adjacent, no gap
    assert all(sum(counts[s:e]) <= 8 for s, e in windows)
    owner = assign_words(windows, len(counts))
    assert all(windows[w][0] <= i < windows[w][1] for i, w in enumerate(owner))


def test_long_sentence_windows_label_every_token(tokenizer):
    words = [f"word{i % 7}x" if i % 5 else "hyperphosphorylation" for i in range(300)]
    tags = ["B-D" if i % 11 == 0 else "I-D" if i % 11 == 1 else "O" for i in range(300)]
    label2id = {"O": 0, "B-D": 1, "I-D": 2}
    feats = encode_sentences([words, ["short"]], [tags, ["O"]], tokenizer, label2id, max_seq_len=32, overlap=8)
    assert len(feats.input_ids) > 10  # the long sentence became many windows
    assert all(len(ids) <= 32 for ids in feats.input_ids)
    targets = feats.targets[0]
    assert len(targets) == 300 and len(set(targets)) == 300  # every token has its own predicted position
    for wi, (fi, pos) in enumerate(targets):
        assert feats.labels[fi][pos] == label2id[tags[wi]]  # first subword carries the word's label
        first_piece = tokenizer(words[wi], add_special_tokens=False)["input_ids"][0]
        assert feats.input_ids[fi][pos] == first_piece
    # Each window: [CLS] ... [SEP], one label per word (first subword), -100 elsewhere.
    for ids, labels in zip(feats.input_ids, feats.labels):
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert labels[0] == labels[-1] == -100
    assert feats.targets[1] == [(len(feats.input_ids) - 1, 1)]


def test_token_without_subwords_still_gets_a_position(tokenizer):
    feats = encode_sentences([["a", "\u200b", "b"]], [["O", "B-X", "O"]], tokenizer, {"O": 0, "B-X": 1}, 16, 4)
    fi, pos = feats.targets[0][1]
    assert feats.input_ids[fi][pos] == tokenizer.unk_token_id and feats.labels[fi][pos] == 1


@pytest.mark.parametrize("corpus", ["NCBI-disease-IOB", "BC5CDR-disease-IOB"])
def test_reads_real_corpora(shared_data, corpus):
    for split in ("train", "devel", "test"):
        f = read_conll(shared_data / "ner" / corpus / f"{split}.tsv")
        assert f.scheme == "iob2" and len(f.sentences) > 500
        assert label_list([f]) == ["O", "B-Disease", "I-Disease"]
    n_lines = sum(1 for line in open(shared_data / "ner" / corpus / "test.tsv", encoding="utf-8") if line.strip())
    assert sum(len(s.tokens) for s in f.sentences) == n_lines
