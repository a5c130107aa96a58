"""The benchmark runs both engines on the same batches and reports comparable figures (speed itself is not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.engine_bench import main, parse_args

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_reports_both_engines(tmp_path, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = main(parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_cpu.json"), "--model", "tiny",
                                  "--seq-len", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
                                  "--peak-tflops", "1.0", "--json", str(tmp_path / "bench.json")]))
    finally:
        torch.set_num_threads(n)
    assert set(report["results"]) == {"ours", "hf_baseline"}
    for r in report["results"].values():
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] and r["tflops"] > 0
        assert r["mfu"] == r["tflops"] / 1.0  # peak from --peak-tflops
    # same samples for both: tokens per sample agree, so the ratio is a pure speed ratio
    ours, hf = report["results"]["ours"], report["results"]["hf_baseline"]
    assert abs(ours["tokens_per_s"] / ours["samples_per_s"] - hf["tokens_per_s"] / hf["samples_per_s"]) < 1e-6
    assert report["speedup"] == ours["samples_per_s"] / hf["samples_per_s"]
    assert 0.25 < report["fill"] < 1.0  # variable-length synthetic samples
    assert json.loads((tmp_path / "bench.json").read_text())["speedup"] == report["speedup"]
    assert "speed-up (ours / HF baseline" in capsys.readouterr().out
