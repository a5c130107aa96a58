"""Where one training step's time goes: torch.profiler over MiniLM (or any model) steps on realistic shards.

    biobert bench profile [--seq-lens 128 512] [--micro-batch 16] [--shards-128 DIR --shards-512 DIR]
                                      [--engines ours hf_baseline] [--top 12] [--json OUT.json]

Shards: the given data_prep directories, else the shared MEDLINE sample prepared on the fly (real variable-length
samples), else synthetic variable-length shards. Each engine trains plain (AdamW, no DeepSpeed: the engine adds no
compute on one CPU rank) for `warmup` steps, then `steps` steps are profiled; ops are ranked by self CPU time.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from biobert.config import option, parse
from biobert.files import atomic_write_json


@dataclass(kw_only=True)
class ProfileConfig:
    """Where a training step's time goes (torch.profiler)."""

    model: str = option("minilm", "minilm, an HF directory, or tiny/base/large")
    seq_lens: list[int] = option(factory=lambda: [128, 512], help="sequence lengths to profile")
    micro_batch: int = option(16, "samples per step")
    shards_128: str | None = option(None, "data_prep shards of seq 128 (default: the shared MEDLINE sample or "
                                          "synthetic)")
    shards_512: str | None = option(None, "data_prep shards of seq 512")
    engines: list[str] = option(factory=lambda: ["ours", "hf_baseline"], help="which models to profile",
                                choices=("ours", "hf_baseline"))
    warmup: int = option(1, "unprofiled steps first")
    steps: int = option(2, "profiled steps")
    top: int = option(12, "ops listed")
    threads: int | None = option(None, "torch CPU threads")
    json: str | None = option(None, "also write the report here")

    @property
    def shards(self) -> dict[int, str]:
        return {s: d for s, d in ((128, self.shards_128), (512, self.shards_512)) if d}


def _shards(cfg: ProfileConfig, seq: int, tmp: Path, vocab_size: int) -> tuple[Path, str]:
    from benchmarks.engine_bench import synthetic_shards
    from benchmarks.grid import SuiteConfig
    from benchmarks.suites import make_real_shards

    if seq in cfg.shards:
        return Path(cfg.shards[seq]), f"given: {cfg.shards[seq]}"
    d = make_real_shards(SuiteConfig(output_dir=str(tmp)), tmp, seq, dynamic=False)
    if d is not None:
        return d, "real: data_prep shards of the shared MEDLINE sample"
    return synthetic_shards(tmp / f"syn-{seq}", seq, vocab_size, 512, 0.25, 0), "synthetic variable-length"


def profile_engine(model, convert, batches: list[dict], warmup: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        out = model(**convert(b))
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:warmup]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[warmup:]:
            step(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return dict(step_ms=total / 1e3 / max(1, len(batches) - warmup),
                top=[dict(op=e.key, self_ms_per_step=e.self_cpu_time_total / 1e3 / max(1, len(batches) - warmup),
                          share=e.self_cpu_time_total / total, calls=e.count) for e in ranked])


def main(cfg: ProfileConfig) -> dict:
    from benchmarks.engine_bench import hf_inputs
    from benchmarks.train_bench import TrainBenchConfig, build_models
    from pretraining.data import PretrainingLoader

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = {"threads": torch.get_num_threads(), "micro_batch": cfg.micro_batch, "model": cfg.model, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seq in cfg.seq_lens:
            ours, hf, config = build_models(TrainBenchConfig(model=cfg.model, seq_len=seq))
            d, source = _shards(cfg, seq, Path(tmp), config.vocab_size)
            with PretrainingLoader(d, micro_batch_size=cfg.micro_batch, grad_accum_steps=1, rank=0, world_size=1,
                                   seed=0, vocab_size=config.vocab_size) as loader:
                it = iter(loader)
                batches = [{k: v for k, v in next(it).items() if k != "sample_ids"}
                           for _ in range(cfg.warmup + cfg.steps)]
            fill = float(sum(b["attention_mask"].sum() for b in batches) / sum(b["attention_mask"].numel()
                                                                              for b in batches))
            case = dict(seq_len=seq, data=source, fill=fill, engines={})
            for name, model, convert in (("ours", ours, lambda b: b), ("hf_baseline", hf, hf_inputs)):
                if name in cfg.engines:
                    case["engines"][name] = profile_engine(model, convert, batches, cfg.warmup, cfg.top)
            report["cases"].append(case)
    return report


def markdown(report: dict) -> str:
    lines = []
    for case in report["cases"]:
        for name, r in case["engines"].items():
            lines += [f"**{name}, seq {case['seq_len']}, micro-batch {report['micro_batch']}, fill {case['fill']:.2f} "
                      f"({case['data']}), {report['threads']} threads: {r['step_ms']:.0f} ms/step**", "",
                      "| op | self ms/step | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{t['op']}` | {t['self_ms_per_step']:.1f} | {t['share']:.1%} | {t['calls']} |" for t in r["top"]]
            lines.append("")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    cfg = parse(ProfileConfig, argv, prog="biobert bench profile", description=__doc__)
    rep = main(cfg)
    print(markdown(rep))
    if cfg.json:
        atomic_write_json(cfg.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
