"""finetuning/benchmark.py: ours vs the HF Trainer, several seeds, mean +- std and a verdict per task."""

import json

import pytest

from finetuning.benchmark import cli, markdown, summarise, verdict


def _runs(f1s, speeds):
    return [{"precision": f, "recall": f, "f1": f, "train_examples_per_s": s} for f, s in zip(f1s, speeds)]


def test_summary_mean_std_and_verdict():
    rows = summarise("NCBI-disease", "ner", {"ours": _runs([0.60, 0.64, 0.62], [50, 48, 52]),
                                             "hf_trainer": _runs([0.58, 0.60, 0.62], [25, 25, 25])})
    ours, hf = rows
    assert ours["f1"] == pytest.approx(0.62) and ours["f1_std"] == pytest.approx(0.02)  # sample std (ddof=1)
    assert hf["train_examples_per_s_std"] == 0.0 and ours["seeds"] == 3 and len(ours["runs"]) == 3
    line = verdict(rows)
    assert "f1 +0.0200 (+1.0 std) over 3 seed(s)" in line and "2.00x" in line
    assert "| NCBI-disease | ours | 3 | 0.6200 ± 0.0200 |" in markdown(rows)


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
    result = cli(["--model", str(minilm_dir), "--data-root", str(tmp_path / "data"), "--tasks", "NCBI-disease",
                   "--seeds", "1", "2", "--epochs", "1", "--batch-size", "6",
                   "--num-threads", "2", "--output-dir", str(out)])
    assert [r["system"] for r in result] == ["ours", "hf_trainer"]
    saved = json.loads((out / "benchmark.json").read_text())
    for row in saved["rows"]:
        assert len(row["runs"]) == 2 and row["train_examples_per_s"] > 0
        assert row["f1"] == pytest.approx(sum(r["f1"] for r in row["runs"]) / 2)
    assert saved["verdicts"][0].startswith("NCBI-disease: ours - HF Trainer f1")
    assert saved["config"]["batch_size"] == "6"  # config flags reach both systems
    assert (out / "seed1" / "NCBI-disease" / "metrics.json").is_file() and (out / "benchmark.md").is_file()
