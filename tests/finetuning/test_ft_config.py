"""Typed configs: CLI flags map to fields, defaults are the paper's, bad values fail early."""

import pytest

from finetuning.config import NERConfig, QAConfig, REConfig, parse_config


def test_flags_map_to_fields():
    cfg = parse_config(REConfig, ["--model", "m", "--data", "d", "--cv-folds", "10", "--no-do-predict",
                                  "--learning-rate", "3e-5", "--max-train-examples", "100", "--local_rank=0"])
    assert (cfg.cv_folds, cfg.do_predict, cfg.do_train, cfg.learning_rate, cfg.max_train_examples) == (
        10, False, True, 3e-5, 100)
    assert parse_config(NERConfig, ["--tag-scheme", "iobes"]).tag_scheme == "iobes"
    assert QAConfig().max_seq_len == 384 and QAConfig().doc_stride == 128


@pytest.mark.parametrize(
    "cls, kwargs",
    [(NERConfig, {"tag_scheme": "bio"}), (REConfig, {"cv_folds": 1}), (NERConfig, {"learning_rate": 0}),
     (QAConfig, {"max_seq_len": 64, "max_query_len": 64}),
     (NERConfig, {"do_train": False, "do_eval": False, "do_predict": False})],
)
def test_invalid_values_fail(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_cli_error_is_a_message():
    with pytest.raises(SystemExit, match="cv_folds"):
        parse_config(REConfig, ["--cv-folds", "1"])


def test_recipes_are_data_applied_under_explicit_flags(capsys):
    from finetuning.config import RECIPES, make_config

    quick = parse_config(NERConfig, [])
    assert quick.recipe == "quick" and quick.epochs == 5.0 and quick.max_seq_len == 128
    paper = parse_config(NERConfig, ["--recipe", "biobert"])
    assert (paper.recipe, paper.epochs, paper.max_seq_len, paper.select_on_dev) == ("biobert", 20.0, 192, True)
    assert parse_config(NERConfig, ["--recipe", "biobert", "--epochs", "4"]).epochs == 4.0  # a flag beats the recipe
    qa = make_config(QAConfig, "biobert")
    assert (qa.batch_size, qa.learning_rate, qa.max_seq_len) == (12, 8e-6, 384)
    assert make_config(REConfig, "biobert").epochs == RECIPES["biobert"]["re"]["epochs"]
    with pytest.raises(SystemExit) as e:
        parse_config(NERConfig, ["--recipe", "fast"])
    assert e.value.code == 2 and "--recipe: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="recipe"):
        make_config(NERConfig, "fast")


def test_every_field_has_help_and_help_names_the_recipe(capsys):
    import dataclasses

    for cls in (NERConfig, REConfig, QAConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    with pytest.raises(SystemExit):
        parse_config(NERConfig, ["--help"])
    text = capsys.readouterr().out
    assert "quick: short runs sized for a CPU" in text and "--recipe biobert: ner: --epochs 20.0" in text
    assert "peak AdamW learning rate (default: 5e-05)" in text
