"""Training throughput at any world size: our engine vs HF ``BertForPreTraining``, same DeepSpeed config, live loader.

    biobert bench train --model minilm --seq-len 128 --micro-batch 8 --json OUT.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/train_bench.py --threads 1 --json OUT.json   # world size 2

Differs from benchmarks/engine_bench.py (one process, batches preloaded) in what a scaling study needs: the batches come
from the real PretrainingLoader while the clock runs (so data wait is measured, as a fraction of step time), each rank
reads its own share, figures are summed over ranks (samples) and taken at the slowest rank (time), and peak memory is
recorded per engine (CUDA: max_memory_allocated; CPU: peak RSS sampled by a psutil thread). Both engines read the same
samples in the same order. Ours runs as the trainer does (benchmarks.engine_bench.build_engine: plan_precision, packed
batches from the loader thread); "ours_compiled" adds model.compile (torch.compile of the encoder layers). The HF
baseline gets the DeepSpeed config as written and what a plain HF script feeds BERT: padded to the shard's seq_len,
labels as a [B, T] tensor (benchmarks.engine_bench.hf_inputs), converted inside the timed loop. The device is
synchronized only at the ends of the timed window (a per-step sync would idle the GPU while the host queues work).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.engine_bench import check_workload
from biobert.config import check_choices, option, parse
from biobert.errors import run
from biobert.files import atomic_write_json

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ENGINES = ("ours", "ours_compiled", "hf_baseline")
DEFAULT_ENGINES = ("ours", "hf_baseline")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class TrainBenchConfig:
    """Our engine vs HF BertForPreTraining at any world size, fed by the live loader."""

    model: str = option("minilm", "tiny | base | large (random init, 30522 vocab) or minilm / an HF BERT directory "
                                  "(weights loaded)")
    seq_len: int = option(128, "sequence length of the synthetic shards (real --shards carry their own)")
    micro_batch: int = option(8, "samples per micro-batch per rank")
    grad_accum: int = option(1, "micro-batches per optimizer step (--steps and --warmup count optimizer steps)")
    zero_stage: int = option(0, "DeepSpeed ZeRO stage: 0 | 1 | 2 | 3", choices=(0, 1, 2, 3))
    precision: str = option("fp32", "fp32 | bf16 | fp16", choices=PRECISIONS)
    optimizer: str = option("adamw", "adamw | lamb (lamb is refused by our engine under ZeRO partitioning; adamw runs "
                                     "everywhere)", choices=("adamw", "lamb"))
    lr: float = option(1e-4, "learning rate")
    steps: int = option(3, "timed optimizer steps per engine")
    warmup: int = option(1, "untimed optimizer steps before the clock starts")
    shards: str | None = option(None, "real data_prep shards (default: synthetic variable-length shards)")
    min_fill: float = option(0.25, "synthetic shards: most lengths are uniform in [seq_len * min_fill, seq_len]")
    threads: int | None = option(None, "torch CPU threads per rank (default: torch's choice)")
    seed: int = option(0, "seeds the weights, the synthetic shards and the loader")
    peak_tflops: float | None = option(None, "peak TFLOPS per device for MFU (default: the data-sheet figure, or a "
                                             "matmul probe on CPU)")
    engines: list[str] = option(factory=lambda: list(DEFAULT_ENGINES), help="engines to measure: ours, ours_compiled, hf_baseline",
                                choices=ENGINES)
    json: str | None = option(None, "rank 0 also writes the report here")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.micro_batch < 1 or self.steps < 1 or self.warmup < 0 or self.grad_accum < 1:
            raise ValueError("micro_batch, grad_accum and steps must be >= 1, warmup >= 0")
        if not self.engines:
            raise ValueError(f"engines: give at least one of {', '.join(ENGINES)}")
        check_workload(self)

    def ds_config(self, world_size: int) -> dict:
        ds = {"train_micro_batch_size_per_gpu": self.micro_batch, "gradient_accumulation_steps": self.grad_accum,
              "train_batch_size": self.micro_batch * self.grad_accum * world_size, "gradient_clipping": 1.0,
              "steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
              "timers": {"throughput": {"enabled": False}},  # as the recipes: its timer synchronizes every step
              "zero_optimization": {"stage": self.zero_stage}}
        if self.precision == "bf16":
            ds.update(bf16={"enabled": True}, communication_data_type="fp32")
        elif self.precision == "fp16":
            ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
        return ds


class PeakMemory:
    """Peak bytes over a block: CUDA max_memory_allocated, or the process RSS sampled every few ms (CPU)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval = device, interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages; hand them back to the OS
    except (OSError, AttributeError):
        pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(step, loader, config, device, steps: int, warmup: int) -> dict:
    """Per-rank totals over the timed steps: samples, tokens, useful FLOPs, seconds, data-wait seconds."""
    from pretraining.metrics import batch_flops

    it = iter(loader)
    tot = dict(samples=0, tokens=0, flops=0.0, seconds=0.0, data_wait=0.0)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        if i >= warmup:
            tot["data_wait"] += time.perf_counter() - t0
            tot["samples"] += len(batch["input_ids"])
            tot["tokens"] += int(batch["attention_mask"].sum())
            tot["flops"] += batch_flops(config, batch["attention_mask"], batch.get("masked_lm_positions"))
        step(batch)
    _sync(device)
    tot["seconds"] = time.perf_counter() - t_start
    return tot


def _reduce(tot: dict, device) -> dict:
    """Sum counts over ranks; time is the slowest rank's (the step ends when every rank is done)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return tot
    dev = device if device.type == "cuda" else torch.device("cpu")
    sums = torch.tensor([tot["samples"], tot["tokens"], tot["flops"]], dtype=torch.float64, device=dev)
    maxes = torch.tensor([tot["seconds"], tot["data_wait"], tot.get("peak_memory_bytes", 0)], dtype=torch.float64,
                         device=dev)
    tdist.all_reduce(sums)
    tdist.all_reduce(maxes, op=tdist.ReduceOp.MAX)
    s, m = sums.tolist(), maxes.tolist()
    return {**tot, "samples": int(s[0]), "tokens": int(s[1]), "flops": s[2], "seconds": m[0], "data_wait": m[1],
            "peak_memory_bytes": int(m[2])}


def figures(tot: dict, peak_per_rank: float, world_size: int) -> dict:
    """Throughput from totals. MFU = achieved useful TFLOPS / (per-device peak x devices)."""
    dt = tot["seconds"]
    tflops = tot["flops"] / dt / 1e12
    peak = peak_per_rank * world_size
    return dict(samples_per_s=tot["samples"] / dt, tokens_per_s=tot["tokens"] / dt, tflops=tflops,
                mfu=tflops / peak if peak and math.isfinite(peak) else None,
                data_wait_fraction=tot["data_wait"] / dt, peak_memory_mb=tot["peak_memory_bytes"] / 2**20,
                seconds=dt, samples=tot["samples"], tokens=tot["tokens"])


def build_models(cfg: TrainBenchConfig):
    """(ours, hf, BertConfig) with identical weights."""
    from transformers import BertConfig

    from benchmarks.engine_bench import hf_twin
    from pretraining.config import PRESETS
    from pretraining.hub import resolve_model_dir
    from pretraining.model import BertForPreTraining, load_pretrained

    torch.manual_seed(cfg.seed)
    if cfg.model in PRESETS:
        config = BertConfig(vocab_size=30522, **PRESETS[cfg.model])
        ours = BertForPreTraining(config)
    else:
        ours = load_pretrained(resolve_model_dir(cfg.model))
        config = ours.config
    ours.train()
    hf = hf_twin(ours)
    return ours, hf, config


def main(cfg: TrainBenchConfig) -> dict:
    import torch.distributed as tdist

    from benchmarks.engine_bench import build_engine, synthetic_shards
    from biobert import dist
    from pretraining.data import PretrainingLoader
    from pretraining.metrics import device_name, peak_tflops
    from pretraining.model import BertForPreTraining

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    device = dist.device()
    ours, hf, config = build_models(cfg)
    peak, peak_source = peak_tflops(device_name(), cfg.precision, cfg.peak_tflops)
    if "matmul probe" in peak_source:
        peak_source += f", {torch.get_num_threads()} thread(s)"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.shards:
            shard_dir = Path(cfg.shards)
        else:  # every rank writes the same (seeded) shards into its own temp dir: no file sharing between ranks
            n = (cfg.warmup + cfg.steps) * cfg.grad_accum * cfg.micro_batch * world
            shard_dir = synthetic_shards(Path(tmp) / "shards", cfg.seq_len, config.vocab_size, max(n, 64),
                                         cfg.min_fill, cfg.seed)
        models = {"ours": ours, "hf_baseline": hf}
        if "ours_compiled" in cfg.engines:  # its own copy: compiling wraps the layers in place
            models["ours_compiled"] = BertForPreTraining(config).train()
            models["ours_compiled"].load_state_dict(ours.state_dict())
        for name in ENGINES:
            if name not in cfg.engines:
                continue
            model = models[name]
            _release_memory()  # so the previous engine's freed memory does not count toward this one's peak RSS
            model.to(device)
            engine, step, how = build_engine(name, model, cfg.ds_config(world), dict(name=cfg.optimizer, lr=cfg.lr),
                                             device)
            loader = PretrainingLoader(shard_dir, micro_batch_size=cfg.micro_batch, grad_accum_steps=cfg.grad_accum,
                                       rank=rank,
                                       world_size=world, seed=cfg.seed, vocab_size=config.vocab_size,
                                       pack=name != "hf_baseline", pin_memory=True)
            try:
                with PeakMemory(device) as mem:
                    tot = run_engine(step, loader, config, device, cfg.steps * cfg.grad_accum,
                                     cfg.warmup * cfg.grad_accum)
            finally:
                loader.close()
            tot["peak_memory_bytes"] = mem.peak
            results[name] = {**figures(_reduce(tot, device), peak, world), "engine": how}
            model.zero_grad(set_to_none=True)
            del engine, step
        seq_len = int(json.loads((shard_dir / "manifest.json").read_text())["seq_len"])
    first = next(iter(results.values()))
    report = dict(config=asdict(cfg), world_size=world, device=device_name(), precision=cfg.precision,
                  zero_stage=cfg.zero_stage, seq_len=seq_len, micro_batch=cfg.micro_batch,
                  params=sum(p.numel() for p in hf.parameters()), fill=first["tokens"] / (first["samples"] * seq_len),
                  peak_tflops_per_device=peak, peak_source=peak_source, torch_threads=torch.get_num_threads(),
                  data=str(cfg.shards) if cfg.shards else f"synthetic (min_fill {cfg.min_fill})", results=results)
    if "ours" in results and "hf_baseline" in results:
        report["speedup"] = results["ours"]["samples_per_s"] / results["hf_baseline"]["samples_per_s"]
    if "ours_compiled" in results and "hf_baseline" in results:
        report["speedup_compiled"] = results["ours_compiled"]["samples_per_s"] / results["hf_baseline"]["samples_per_s"]
    if cfg.json and rank == 0:
        atomic_write_json(cfg.json, report)
    return report


def parse_args(argv: list[str] | None = None) -> TrainBenchConfig:
    return parse(TrainBenchConfig, argv, prog="biobert bench train", description=__doc__)


def cli(argv: list[str] | None = None) -> int:
    report = main(parse_args(argv))
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        print(f"device {report['device']} | world {report['world_size']} | {report['precision']} ZeRO "
              f"{report['zero_stage']} | seq {report['seq_len']} | micro {report['micro_batch']} | "
              f"fill {report['fill']:.2f} | peak {report['peak_tflops_per_device']:.3g} TFLOPS ({report['peak_source']})")
        for name, r in report["results"].items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"  {name:13s} {r['samples_per_s']:9.2f} samples/s  MFU {mfu}  data wait "
                  f"{r['data_wait_fraction']:.1%}  peak memory {r['peak_memory_mb']:.0f} MB  [{r['engine']}]")
        if "speedup" in report:
            print(f"  speed-up (ours / HF baseline, samples/s): {report['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
