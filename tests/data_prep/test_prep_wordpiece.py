"""Casing must be honoured both ways, and a vocab that does not match the flag is an error."""

from __future__ import annotations

import json
import shutil

import pytest

from data_prep.extract import DataError
from data_prep.wordpiece import load_wordpiece


def test_uncased_vocab_follows_tokenizer_config(minilm_dir):
    wp = load_wordpiece(minilm_dir)
    assert wp.lower_case is True and wp.vocab_size == 30522
    assert wp.tokens[wp.mask_id] == "[MASK]" and wp.is_special[wp.cls_id] and not wp.is_special[wp.replacement_ids].any()
    (ids,) = wp.encode(["BRCA1 Mutations"])
    assert [wp.tokens[i] for i in ids] == [wp.tokens[i] for i in wp.encode(["brca1 mutations"])[0]]


def test_uncased_vocab_with_cased_flag_is_an_error(minilm_dir, uncased_vocab, tmp_path):
    with pytest.raises(DataError, match=r"vocab is uncased \(from tokenizer_config.json do_lower_case\) but --cased"):
        load_wordpiece(minilm_dir, lower_case=False)
    bare = tmp_path / "vocab.txt"  # no tokenizer_config.json: detected from the tokens
    shutil.copy(uncased_vocab, bare)
    with pytest.raises(DataError, match=r"vocab\.txt: vocab is uncased \(from its tokens\) but --cased"):
        load_wordpiece(bare, lower_case=False)
    assert load_wordpiece(bare).lower_case is True


def test_cased_vocab_keeps_case_and_rejects_lower_case(cased_vocab):
    wp = load_wordpiece(cased_vocab)
    assert wp.lower_case is False
    (ids,) = wp.encode(["BRCA1 DNA dna The"])
    assert [wp.tokens[i] for i in ids] == ["BRCA", "##1", "DNA", "dna", "The"]
    with pytest.raises(DataError, match="vocab is cased .* but --lower-case was given"):
        load_wordpiece(cased_vocab, lower_case=True)


def test_declared_casing_wins(cased_vocab, tmp_path):
    shutil.copy(cased_vocab, tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    assert load_wordpiece(tmp_path).lower_case is True


def test_missing_vocab_and_missing_specials(tmp_path):
    with pytest.raises(DataError, match="vocab not found"):
        load_wordpiece(tmp_path / "nothing")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"lacks BERT special tokens \['\[PAD\]'"):
        load_wordpiece(tmp_path / "vocab.txt")
