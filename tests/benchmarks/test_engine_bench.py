"""The benchmark runs both engines on the same batches and reports comparable figures (speed itself is not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.engine_bench import cli, main, parse_args

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


def test_bench_flags_keep_their_spellings_and_mistakes_are_one_line(capsys):
    from benchmarks import train_bench
    from biobert.errors import run

    cfg = parse_args(["--deepspeed_config", "x.json", "--micro-batch", "3", "--only", "hf_baseline", "--local_rank=0"])
    assert (cfg.deepspeed_config, cfg.micro_batch, cfg.only) == ("x.json", 3, "hf_baseline")
    # what benchmarks.suites.train_subprocess passes, plus the deepspeed launcher's --local_rank
    cfg = train_bench.parse_args(["--model", "tiny", "--seq-len", "64", "--micro-batch", "2", "--zero-stage", "2",
                                  "--precision", "bf16", "--optimizer", "adamw", "--steps", "2", "--warmup", "0",
                                  "--min-fill", "0.5", "--seed", "3", "--json", "o.json", "--threads", "1",
                                  "--peak-tflops", "2", "--engines", "ours", "ours_compiled", "--local_rank=1"])
    assert (cfg.zero_stage, cfg.precision, cfg.engines, cfg.json, cfg.peak_tflops) == (
        2, "bf16", ["ours", "ours_compiled"], "o.json", 2.0)
    for tool, argv, fragment in ((train_bench, ["--zero-stage", "4"], "zero_stage: 4 is not one of 0, 1, 2, 3"),
                                 (train_bench, ["--engines", "ours", "hf"], "engines: 'hf' is not one of"),
                                 (train_bench, ["--steps", "0"], "steps must be >= 1"),
                                 (train_bench, ["--precison", "bf16"], "did you mean --precision?"),
                                 (None, [], "--deepspeed-config is required"),
                                 (None, ["--deepspeed_config", "x", "--only", "ours_compiled"], "add --compile")):
        assert run(tool.cli if tool else cli, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (argv, err)
