"""Training throughput, side by side: our engine vs plain HF ``transformers.BertForPreTraining``, same DeepSpeed config.

    biobert bench engine --deepspeed_config ds_configs/tiny_cpu.json --model tiny --seq-len 128
    deepspeed --num_gpus 1 --module benchmarks.engine_bench --deepspeed_config ds_configs/bert_base_seq512_lamb_bf16.json \\
        --model base --seq-len 512 [--shards DIR]

Both models get the same weights, optimizer class, DeepSpeed config (precision, ZeRO, accumulation) and the same
samples. Ours runs as the trainer runs it (pretraining.optim.plan_precision: at ZeRO 0 fp32 master weights under
autocast with our multi-tensor step; batches packed by the loader thread); the baseline gets the DeepSpeed config as
written and what a plain HF script feeds BERT: every sequence padded to --seq-len, labels as a [B, T] tensor with -100
off the masked positions. --compile adds "ours_compiled" (model.compile: torch.compile of the encoder layers). Samples come
from --shards (real data_prep shards) or from synthetic shards with variable lengths: 10% uniform in [8, L] (BERT's
short_seq_prob) and the rest uniform in [L*min_fill, L] (default 0.25: PubMed abstracts rarely fill 512 tokens).
Reported per model: samples/s, tokens/s (non-padding), TFLOPS and MFU (useful model FLOPs at each sequence's real
length, pretraining.metrics), then the speed-up ratio. Runs on one process (world size 1).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biobert.config import check_choices, option, parse
from biobert.errors import run
from biobert.files import atomic_write_json


def synthetic_shards(out_dir: Path, seq_len: int, vocab_size: int, samples: int, min_fill: float, seed: int,
                     lengths: np.ndarray | None = None) -> Path:
    """Dynamic-masking shards whose lengths follow the distribution in the module docstring (or are `lengths`)."""
    import h5py

    from benchmarks import synthetic as syn

    syn.write_synthetic_shards(out_dir, num_shards=1, samples_per_shard=samples, seq_len=seq_len,
                               max_predictions=max(1, round(0.15 * seq_len)), masking="dynamic",
                               vocab_size=vocab_size, seed=seed)
    rng = np.random.default_rng(seed)
    path = next(out_dir.glob("*.hdf5"))
    with h5py.File(path, "r+") as f:  # re-cut lengths: pad out everything past each sample's new length
        ids, seg = f["input_ids"][()], f["segment_ids"][()]
        if lengths is None:
            lengths = rng.integers(int(seq_len * min_fill), seq_len + 1, size=len(ids))
            short = rng.random(len(ids)) < 0.1
            lengths[short] = rng.integers(8, seq_len + 1, size=int(short.sum()))
        lengths = np.clip(np.asarray(lengths, dtype=np.int64)[:len(ids)], 2, seq_len)
        pos = np.arange(seq_len)[None, :]
        real = pos < lengths[:, None]
        ids[~real] = 0
        ids[np.arange(len(ids)), lengths - 1] = syn.SEP_ID
        seg[~real] = 0
        f["input_ids"][...], f["input_mask"][...], f["segment_ids"][...] = ids, real.astype(np.int8), seg
    from data_prep import contract

    manifest = contract.Manifest.load(out_dir)
    manifest.shards[0].sha256 = contract.sha256_file(path)
    manifest.shards[0].tokens = int(lengths.sum())
    manifest.save(out_dir)
    return out_dir


def hf_inputs(batch: dict) -> dict:
    """What a plain HF script passes: padded ids and a [B, T] label tensor."""
    labels = torch.full_like(batch["input_ids"], -100)
    used = batch["masked_lm_positions"] != 0
    rows = torch.arange(labels.shape[0])[:, None].expand_as(used)
    labels[rows[used], batch["masked_lm_positions"][used]] = batch["masked_lm_ids"][used]
    return dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], labels=labels,
                next_sentence_label=batch["next_sentence_labels"])


def hf_twin(ours) -> torch.nn.Module:
    """transformers.BertForPreTraining with our model's weights, in train mode: the baseline every benchmark uses."""
    import transformers
    from transformers import BertConfig

    from pretraining.model import TRAINING_ONLY_CONFIG_KEYS

    config = BertConfig(**{k: v for k, v in ours.config.to_dict().items() if k not in TRAINING_ONLY_CONFIG_KEYS})
    hf = transformers.BertForPreTraining(config)
    hf.load_state_dict(ours.state_dict(), strict=False)  # same names; the decoder is tied in both
    return hf.train()


ENGINES = ("ours", "ours_compiled", "hf_baseline")


def check_workload(cfg) -> None:
    """The settings the engine and training benchmarks share: sequence length, synthetic fill, threads, peak."""
    if cfg.seq_len < 8:
        raise ValueError(f"seq_len must be >= 8, got {cfg.seq_len}")
    if not 0 < cfg.min_fill <= 1:
        raise ValueError(f"min_fill must be in (0, 1], got {cfg.min_fill}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {cfg.peak_tflops}")


@dataclass(kw_only=True)
class EngineBenchConfig:
    """Our engine vs HF BertForPreTraining on the same preloaded batches, one process."""

    deepspeed_config: str = option(help="DeepSpeed JSON (batch, precision, ZeRO, optimizer), read as a training run "
                                        "reads it")
    model: str = option("tiny", "tiny | base | large (random init) or an HF BERT directory")
    tokenizer: str | None = option(None, "vocab for the presets (default: 30522 tokens, the BERT uncased size)")
    seq_len: int = option(128, "sequence length of the synthetic shards (real --shards carry their own)")
    micro_batch: int | None = option(None, "override the DeepSpeed config's train_micro_batch_size_per_gpu")
    min_fill: float = option(0.25, "synthetic shards: most lengths are uniform in [seq_len * min_fill, seq_len]")
    shards: str | None = option(None, "real data_prep shards instead of synthetic ones")
    steps: int = option(5, "timed optimizer steps per engine")
    warmup: int = option(2, "untimed optimizer steps before the clock starts")
    seed: int = option(0, "seeds the weights, the synthetic shards and the loader")
    peak_tflops: float | None = option(None, "peak TFLOPS for MFU (default: the device's data-sheet figure, or a "
                                             "matmul probe on CPU)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    only: str | None = option(None, "measure this engine alone: ours | ours_compiled | hf_baseline", choices=ENGINES)
    compile: bool = option(False, "also measure ours_compiled (model.compile: torch.compile of the encoder layers)")
    json: str | None = option(None, "also write the report here")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={self.steps} warmup={self.warmup}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        check_workload(self)
        if self.only == "ours_compiled" and not self.compile:
            raise ValueError("--only ours_compiled measures nothing without --compile: add --compile")


def build_engine(name: str, model, ds_config: dict, opt: dict, device):
    """-> (engine, step(batch) -> None, description). ``opt``: name, lr and optionally betas/eps/weight_decay.

    ours / ours_compiled: as the trainer runs it (plan_precision, packed batches, our step); hf_baseline: the DeepSpeed
    config as written (DeepSpeed wraps the same optimizer class as that config says), padded HF inputs."""
    import deepspeed

    from pretraining.optim import build_optimizer, plan_precision

    hp = dict(lr=opt["lr"], betas=tuple(opt.get("betas", (0.9, 0.999))), eps=opt.get("eps", 1e-6),
              weight_decay=opt.get("weight_decay", 0.01), device_type=device.type)
    if name == "hf_baseline":
        optimizer = build_optimizer(model, opt["name"], **hp)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(ds_config))

        def step(batch):
            out = engine(**{k: v.to(device, non_blocking=True) for k, v in hf_inputs(batch).items()})
            engine.backward(out["loss"])
            engine.step()

        return engine, step, f"{type(engine.optimizer).__name__}({type(optimizer).__name__}), padded, HF attention"
    plan = plan_precision(ds_config)
    optimizer = build_optimizer(model, opt["name"], **hp, plan=plan)
    if name == "ours_compiled":
        model.bert.compile_layers()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.ds_config)
    dtype = plan.autocast_dtype or next(model.parameters()).dtype

    def step(batch):
        with plan.autocast(device.type):
            out = engine(packed=batch["packed"].to(device, non_blocking=True))
        engine.backward(plan.scale_loss(out["loss"]))
        engine.step()

    return engine, step, (f"{optimizer.implementation}, {plan.describe()}, attention "
                          f"{model.bert.attention_path(device, dtype)}")


def measure(step, batches: list[dict], config, steps: int, warmup: int, accum: int, device) -> dict:
    """Time `steps` optimizer steps after `warmup` ones; the device is synchronized only at the two ends."""
    from pretraining.metrics import batch_flops

    groups = [batches[i * accum:(i + 1) * accum] for i in range(warmup + steps)]
    for g in groups[:warmup]:
        for b in g:
            step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for g in groups[warmup:]:
        for b in g:
            step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    timed = [b for g in groups[warmup:] for b in g]
    samples = sum(len(b["input_ids"]) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    flops = sum(batch_flops(config, b["attention_mask"], b["masked_lm_positions"]) for b in timed)
    return dict(samples_per_s=samples / dt, tokens_per_s=tokens / dt, tflops=flops / dt / 1e12, seconds=dt)


def main(cfg: EngineBenchConfig) -> dict:
    from transformers import BertConfig

    from biobert import dist
    from data_prep.contract import read_vocab_tokens
    from pretraining.config import PRESETS, load_config
    from pretraining.data import PretrainingLoader
    from pretraining.metrics import device_name, peak_tflops
    from pretraining.model import BertForPreTraining, load_pretrained

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init()
    # the DeepSpeed JSON read the way a training run reads it (batch, precision, ZeRO, optimizer)
    overrides = [("batch.micro_batch_size", cfg.micro_batch), ("batch.global_batch_size", None),
                 ("batch.grad_accum_steps", None)] if cfg.micro_batch else []
    run_cfg = load_config({"output_dir": "-", "max_steps": 1, "data": {"shard_dir": "-"}}, cfg.deepspeed_config,
                          overrides)
    accum, micro, precision = run_cfg.grad_accum(1), run_cfg.batch.micro(1), run_cfg.precision
    opt = dataclasses.asdict(run_cfg.optimizer)
    device = dist.device()

    torch.manual_seed(cfg.seed)
    if cfg.model in PRESETS:
        vocab = read_vocab_tokens(cfg.tokenizer) if cfg.tokenizer else None
        config = BertConfig(vocab_size=len(vocab) if vocab else 30522, **PRESETS[cfg.model])
        ours = BertForPreTraining(config)
    else:
        ours = load_pretrained(cfg.model).train()
        config = ours.config
    ours.train()
    hf = hf_twin(ours)
    compiled = None
    if cfg.compile:
        compiled = BertForPreTraining(config).train()
        compiled.load_state_dict(ours.state_dict())

    n_batches = (cfg.steps + cfg.warmup) * accum
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(cfg.shards) if cfg.shards else synthetic_shards(
            Path(tmp) / "shards", cfg.seq_len, config.vocab_size, n_batches * micro, cfg.min_fill, cfg.seed)
        loader = PretrainingLoader(shard_dir, micro_batch_size=micro, grad_accum_steps=accum, rank=0, world_size=1,
                                   seed=cfg.seed, vocab_size=config.vocab_size, pack=True)
        it = iter(loader)
        batches = [next(it) for _ in range(n_batches)]
        loader.close()
    for b in batches:
        b.pop("sample_ids")
    peak, peak_source = peak_tflops(device_name(), precision, cfg.peak_tflops)
    ds = run_cfg.deepspeed_dict(1, config.hidden_size)

    results = {}
    for name, model in (("ours", ours), ("ours_compiled", compiled), ("hf_baseline", hf)):
        if model is None or (cfg.only and name != cfg.only):
            continue
        model.to(device)
        engine, step, how = build_engine(name, model, ds, opt, device)
        r = measure(step, batches, config, cfg.steps, cfg.warmup, accum, device)
        r["mfu"] = r["tflops"] / peak if peak == peak else None
        r["engine"] = how
        results[name] = r
        del engine, step
    seq = batches[0]["input_ids"].shape[1]
    fill = float(np.mean([float(b["attention_mask"].float().mean()) for b in batches]))
    report = dict(device=device_name(), precision=precision, model=cfg.model, seq_len=seq, micro_batch=micro,
                  grad_accum=accum, fill=fill, peak_tflops=peak, peak_source=peak_source, results=results,
                  data=str(cfg.shards or f"synthetic (min_fill {cfg.min_fill})"), torch_threads=torch.get_num_threads())
    if "ours" in results and "hf_baseline" in results:
        report["speedup"] = results["ours"]["samples_per_s"] / results["hf_baseline"]["samples_per_s"]
    if "ours_compiled" in results and "hf_baseline" in results:
        report["speedup_compiled"] = results["ours_compiled"]["samples_per_s"] / results["hf_baseline"]["samples_per_s"]
    print(f"device {report['device']} | {precision} | model {cfg.model} | seq {seq} | micro {micro} x accum {accum} | "
          f"non-padding fill {fill:.2f} | peak {peak:.3g} TFLOPS ({peak_source})")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"  {name:13s} {r['samples_per_s']:9.2f} samples/s {r['tokens_per_s']:11.0f} tokens/s "
              f"{r['tflops']:8.4f} TFLOPS  MFU {mfu}  [{r['engine']}]")
    if "speedup" in report:
        print(f"  speed-up (ours / HF baseline, samples/s): {report['speedup']:.2f}x")
    if "speedup_compiled" in report:
        print(f"  speed-up (ours_compiled / HF baseline, samples/s): {report['speedup_compiled']:.2f}x")
    if cfg.json:
        atomic_write_json(cfg.json, report)
    return report


def parse_args(argv: list[str] | None = None) -> EngineBenchConfig:
    return parse(EngineBenchConfig, argv, prog="biobert bench engine", description=__doc__)


def cli(argv: list[str] | None = None) -> int:
    main(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
