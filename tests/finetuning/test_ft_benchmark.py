"""finetuning/benchmark.py: ours vs the HF Trainer, several seeds, mean +- std and a verdict per task."""

import json

import pytest

from biobert.config import parse_suite
from finetuning.benchmark import FinetuneBenchConfig, main, markdown, summarise, verdict
from finetuning.config import TASK_CONFIGS


def _runs(f1s, speeds, cpu_speeds=None):
    return [{"precision": f, "recall": f, "f1": f, "train_examples_per_s": s, "train_examples_per_cpu_s": c}
            for f, s, c in zip(f1s, speeds, cpu_speeds or speeds)]


def test_summary_mean_std_and_verdict():
    rows = summarise("NCBI-disease", "ner", {"ours": _runs([0.60, 0.64, 0.62], [50, 48, 52], [30, 30, 30]),
                                             "hf_trainer": _runs([0.58, 0.60, 0.62], [25, 25, 25], [20, 20, 20])})
    ours, hf = rows
    assert ours["f1"] == pytest.approx(0.62) and ours["f1_std"] == pytest.approx(0.02)  # sample std (ddof=1)
    assert hf["train_examples_per_s_std"] == 0.0 and ours["seeds"] == 3 and len(ours["runs"]) == 3
    line = verdict(rows)
    # on a CPU the ratio is read on CPU time (1.5x here), not on the load-sensitive wall clock (2x)
    assert "f1 +0.0200 (+1.0 std) over 3 seed(s)" in line and line.endswith("training speed 1.50x (CPU time)")
    assert "| NCBI-disease | ours | 3 | 0.6200 ± 0.0200 | 0.6200 ± 0.0200 | 0.6200 ± 0.0200 | 50.0 ± 2.0 | 30.0 ± 0.0 |" \
        in markdown(rows)


def test_two_seeds_both_systems_end_to_end(minilm_dir, tmp_path):
    data = tmp_path / "data" / "ner" / "NCBI-disease-IOB"
    data.mkdir(parents=True)
    sentence = "Patients with {} had {} .\n"
    rows = []
    for a, b in [("cancer", "fever"), ("diabetes", "pain"), ("asthma", "colitis")] * 6:
        words = sentence.format(a, b).split()
        tags = ["O", "O", "B-Disease", "O", "B-Disease", "O"]
        rows.append("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")
    (data / "train.tsv").write_text("".join(rows))
    (data / "test.tsv").write_text("".join(rows[:6]))
    out = tmp_path / "out"
    argv = ["--model", str(minilm_dir), "--data-root", str(tmp_path / "data"), "--tasks", "NCBI-disease",
            "--seeds", "1", "2", "--epochs", "1", "--batch-size", "6", "--num-threads", "2", "--output-dir", str(out)]
    result = main(*parse_suite(FinetuneBenchConfig, TASK_CONFIGS.values(), argv, prog="t"))
    assert [r["system"] for r in result] == ["ours", "hf_trainer"]
    saved = json.loads((out / "benchmark.json").read_text())
    for row in saved["rows"]:
        assert len(row["runs"]) == 2 and row["train_examples_per_s"] > 0 and row["train_examples_per_cpu_s"] > 0
        assert row["f1"] == pytest.approx(sum(r["f1"] for r in row["runs"]) / 2)
    assert saved["verdicts"][0].startswith("NCBI-disease: ours - HF Trainer f1")
    assert saved["config"]["batch_size"] == "6"  # config flags reach both systems
    assert (out / "seed1" / "NCBI-disease" / "metrics.json").is_file() and (out / "benchmark.md").is_file()


def test_parity_targets_flag_score_collapse_and_speed():
    from finetuning.benchmark import targets

    rows = summarise("NER-sparse", "ner", {"ours": _runs([0.40, 0.0, 0.38], [40, 40, 40]),
                                           "hf_trainer": _runs([0.41, 0.35, 0.40], [20, 20, 20])})
    line = targets(rows)
    assert line.startswith("NER-sparse targets: score FAIL") and "no collapse FAIL (seed runs [2])" in line
    assert "speed ok (2.00x" in line
    constant = [{**r, "collapsed": True} for r in _runs([0.39, 0.39], [30, 30])]  # majority class: F1 > 0
    rows = summarise("ChemProt", "re", {"ours": constant, "hf_trainer": _runs([0.33, 0.32], [25, 25])})
    line = targets(rows)
    assert "no collapse FAIL (seed runs [1, 2])" in line and "ours collapsed in seed runs [1, 2]:" in line
    rows = summarise("ChemProt", "re", {"ours": _runs([0.50, 0.52], [30, 30]), "hf_trainer": _runs([0.50, 0.51], [25, 25])})
    assert targets(rows) == ("ChemProt targets: score ok (+0.0050, margin -0.005), no collapse ok, "
                             "speed FAIL (1.20x, target 1.5x)")


def test_parity_plan_writes_the_dense_and_sparse_sets(shared_data, tmp_path):
    from finetuning.bench_data import density
    from finetuning.benchmark import _parity_plan
    from finetuning.ner_data import read_conll

    plan = _parity_plan(shared_data, tmp_path, ["NER-dense", "NER-sparse", "ChemProt"])
    assert [(t.name, t.kind) for t, _, _ in plan] == [("NER-dense", "ner"), ("NER-sparse", "ner"), ("ChemProt", "re")]
    dense = read_conll(tmp_path / "ner/NER-dense/train.tsv").sentences
    sparse = read_conll(tmp_path / "ner/NER-sparse/train.tsv").sentences
    assert len(dense) == 1450 and density(dense)[2] > 0.5
    assert len(sparse) == 1400 and density(sparse)[1:] == (168, 0.12)
    assert plan[2][1] == shared_data and plan[2][2] == {"max_train_examples": 1000, "max_eval_examples": 500}
