"""Typed configs: CLI flags map to fields, defaults are the paper's, bad values fail early."""

import pytest

from biobert.config import parse
from finetuning.config import NERConfig, QAConfig, REConfig


def test_flags_map_to_fields():
    cfg = parse(REConfig, ["--model", "m", "--data", "d", "--cv-folds", "10", "--no-do-predict",
                           "--learning-rate", "3e-5", "--max-train-examples", "100", "--local_rank=0"], prog="t")
    assert (cfg.cv_folds, cfg.do_predict, cfg.do_train, cfg.learning_rate, cfg.max_train_examples) == (
        10, False, True, 3e-5, 100)
    assert parse(NERConfig, ["--data", "d", "--tag-scheme", "iobes"], prog="t").tag_scheme == "iobes"
    assert QAConfig(data="d").max_seq_len == 384 and QAConfig(data="d").doc_stride == 128


@pytest.mark.parametrize(
    "cls, kwargs",
    [(NERConfig, {"tag_scheme": "bio"}), (REConfig, {"cv_folds": 1}), (NERConfig, {"learning_rate": 0}),
     (QAConfig, {"max_seq_len": 64, "max_query_len": 64}),
     (NERConfig, {"do_train": False, "do_eval": False, "do_predict": False})],
)
def test_invalid_values_fail(cls, kwargs):
    with pytest.raises(ValueError):
        cls(data="d", **kwargs)


def test_cli_error_is_a_message():
    with pytest.raises(ValueError, match="cv_folds"):
        parse(REConfig, ["--data", "d", "--cv-folds", "1"], prog="t")
