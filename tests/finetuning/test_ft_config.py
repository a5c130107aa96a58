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


def test_recipes_are_data_applied_under_explicit_flags():
    from finetuning.config import RECIPES, build_task, parse_task

    quick = parse_task(NERConfig, ["--data", "d"], prog="t")
    assert quick.recipe == "quick" and quick.epochs == 5.0 and quick.max_seq_len == 128 and quick.warmup_ratio == 0
    paper = parse_task(NERConfig, ["--data", "d", "--recipe", "biobert"], prog="t")
    assert (paper.recipe, paper.epochs, paper.max_seq_len, paper.select_on_dev) == ("biobert", 20.0, 192, True)
    assert paper.warmup_ratio == 0.1
    flag_wins = parse_task(NERConfig, ["--data", "d", "--recipe=biobert", "--epochs", "4"], prog="t")
    assert (flag_wins.epochs, flag_wins.max_seq_len) == (4.0, 192)  # a flag beats the recipe, the rest stays
    qa = build_task(QAConfig, {"recipe": "biobert", "data": "d"})
    assert (qa.batch_size, qa.learning_rate, qa.max_seq_len) == (12, 8e-6, 384)
    assert build_task(REConfig, {"recipe": "biobert", "data": "d"}).epochs == RECIPES["biobert"]["re"]["epochs"]
    with pytest.raises(ValueError, match="recipe must be one of quick, biobert, got 'fast'"):
        parse_task(NERConfig, ["--data", "d", "--recipe", "fast"], prog="t")
    with pytest.raises(ValueError, match="recipe"):
        build_task(NERConfig, {"recipe": "fast", "data": "d"})


def test_a_recipe_named_in_the_config_file_sets_its_values(tmp_path):
    from finetuning.config import parse_task

    (tmp_path / "run.yaml").write_text("recipe: biobert\nlearning_rate: 3e-5\n")
    cfg = parse_task(NERConfig, ["--data", "d", "--config", str(tmp_path / "run.yaml")], prog="t")
    assert (cfg.recipe, cfg.epochs, cfg.max_seq_len, cfg.learning_rate) == ("biobert", 20.0, 192, 3e-5)
    flag_wins = parse_task(NERConfig, ["--data", "d", f"--config={tmp_path / 'run.yaml'}", "--recipe", "quick"],
                           prog="t")
    assert (flag_wins.recipe, flag_wins.epochs, flag_wins.learning_rate) == ("quick", 5.0, 3e-5)


def test_suite_builds_tasks_over_their_recipe():
    from finetuning.config import build_task

    cfg = build_task(NERConfig, {"data": "d", "recipe": "biobert", "epochs": "2"})
    assert (cfg.epochs, cfg.max_seq_len, cfg.recipe) == (2.0, 192, "biobert")
    assert build_task(REConfig, {"data": "d"}).recipe == "quick"


def test_every_field_has_help_and_help_names_the_recipe(capsys):
    import dataclasses

    from finetuning.config import parse_task

    for cls in (NERConfig, REConfig, QAConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    with pytest.raises(SystemExit):
        parse_task(NERConfig, ["--help"], prog="t")
    text = " ".join(capsys.readouterr().out.split())
    assert "quick: short runs sized for a CPU" in text and "--recipe biobert sets: --epochs 20.0" in text
