"""The shared fine-tuning loop: AdamW + linear warmup/decay, length-bucketed dynamic padding, dev-set model selection.

Runs with plain ``python`` on one device, or under the ``deepspeed`` launcher (LOCAL_RANK/WORLD_SIZE in the
environment), where the model becomes a DeepSpeed engine and each rank takes its slice of every epoch's batches.
Evaluation runs the whole dev/test set on every rank (fine-tuning sets are small), and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from finetuning import curves
from finetuning.config import FinetuneConfig

CURVE_POINTS = 100  # points of the training-loss curve kept in metrics.json

# ------------------------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    deepspeed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: FinetuneConfig) -> Runtime:
    """Seeds, CPU threads, and the process group when a launcher started us (deepspeed, torchrun, srun, mpirun: the
    same rank discovery as pretraining, so `srun -n 4` is one 4-rank job, not four jobs writing one directory)."""
    from biobert import dist, tracking

    tracking.check_installed(tracking.resolve(cfg.report_to), "--report-to")  # before any work, on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    env = dist.discover()
    if env.launcher == "python":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Runtime(device)
    dist.init()
    return Runtime(dist.device(), env.rank, env.world_size, deepspeed=True)


# ---------------------------------------------------------------------------------------------------------------- data


def collate(features: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding); per-token labels pad with -100."""
    T = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(features), T, dtype=torch.long),
        "token_type_ids": torch.zeros(len(features), T, dtype=torch.long),
    }
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if "token_type_ids" in f:
            batch["token_type_ids"][i, :n] = torch.tensor(f["token_type_ids"])
    for key in ("labels", "start_positions", "end_positions"):
        if key not in features[0]:
            continue
        if isinstance(features[0][key], list):
            labels = torch.full((len(features), T), -100, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, : len(f[key])] = torch.tensor(f[key])
            batch[key] = labels
        else:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return batch


def make_batches(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int, bucket: bool) -> list[list[int]]:
    """Index batches. Training: shuffled; with ``bucket``, sorted by length inside pools of batches and the batch
    order shuffled, so a batch pads little but the data order stays random. Eval: longest first.

    A pool is 50 batches, but at most a quarter of the set (as HF's LengthGroupedSampler): one pool holding the
    whole set would sort it, and every epoch would then see (nearly) the same batches, differing only among ties."""
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: -lengths[i])
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(idx)
    if bucket:
        pool = batch_size * max(1, min(50, len(idx) // (4 * batch_size)))
        idx = [i for s in range(0, len(idx), pool) for i in sorted(idx[s : s + pool], key=lambda i: lengths[i])]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(cfg: FinetuneConfig, rt: Runtime):
    if cfg.bf16 and not rt.deepspeed:
        return torch.autocast(rt.device.type, dtype=torch.bfloat16)
    return nullcontext()


# ------------------------------------------------------------------------------------------------------------ optimizer


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, total_steps: int):
    """pretraining.optim's AdamW (no decay on biases and LayerNorm, as BERT; torch's fused kernel on CPU and CUDA)
    and its schedule: linear warmup over warmup_ratio of the steps, then linear decay to 0."""
    from pretraining.optim import build_optimizer as build
    from pretraining.optim import build_scheduler

    device = next(model.parameters()).device.type
    opt = build(model, "adamw", cfg.learning_rate, (0.9, 0.999), cfg.adam_epsilon, cfg.weight_decay, device_type=device)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)  # as transformers counts a warmup ratio
    return opt, build_scheduler(opt, warmup, total_steps, "linear")


def _deepspeed_config(cfg: FinetuneConfig, rt: Runtime) -> dict:
    """The DeepSpeed dict, generated the way pretraining generates its own: precision and ZeRO from --bf16 and
    --zero-stage, or read from a user's DeepSpeed JSON (its batch and optimizer sections yield to our flags)."""
    from biobert.config import build, read_file
    from pretraining.ds_config import EngineConfig, deepspeed_dict, read_deepspeed, resolve_ds_config

    engine = {"precision": "bf16" if cfg.bf16 else "fp32", "zero_stage": cfg.zero_stage,
              "gradient_clipping": cfg.max_grad_norm}
    if cfg.deepspeed_config:
        path = resolve_ds_config(cfg.deepspeed_config)
        engine.update(read_deepspeed(read_file(path), str(path)).get("engine", {}))
    batch = {"train_batch_size": cfg.batch_size * rt.world_size, "train_micro_batch_size_per_gpu": cfg.batch_size,
             "gradient_accumulation_steps": 1}
    return deepspeed_dict(build(EngineConfig, engine, "engine"), batch)


# ------------------------------------------------------------------------------------------------------------- loops


@torch.no_grad()
def predict(
    model: nn.Module, features: Sequence[dict], cfg: FinetuneConfig, rt: Runtime, keys: Sequence[str], per_token: bool
) -> dict:
    """{key: [np.ndarray per feature, in input order]}; ``per_token`` outputs are trimmed to the feature's length."""
    model.eval()
    out: dict[str, list] = {k: [None] * len(features) for k in keys}
    lengths = [len(f["input_ids"]) for f in features]
    batches = make_batches(lengths, cfg.eval_batch_size, shuffle=False, seed=0, bucket=False)
    for idx in tqdm(batches, desc="predict", leave=False, disable=not (cfg.progress and rt.is_main)):
        batch = collate([{"input_ids": features[i]["input_ids"], **_types(features[i])} for i in idx])
        with _autocast(cfg, rt):
            result = model(**_to(batch, rt.device))
        for k in keys:
            values = result[k].float().cpu().numpy()
            for row, i in enumerate(idx):
                out[k][i] = values[row, : lengths[i]] if per_token else values[row]
    return out


def _n_targets(f: dict) -> int:
    """Labelled positions of a training feature: tokens not -100 for per-token labels, else 1 (one label/span)."""
    labels = f.get("labels")
    return sum(lab != -100 for lab in labels) if isinstance(labels, list) else 1


def _types(f: dict) -> dict:
    return {"token_type_ids": f["token_type_ids"]} if "token_type_ids" in f else {}


def fit(
    model: nn.Module,
    features: Sequence[dict],
    cfg: FinetuneConfig,
    rt: Runtime,
    evaluate: Callable[[nn.Module], dict] | None = None,
    select: str = "f1",
    desc: str = "train",
    out_dir: str | None = None,
) -> dict:
    """Train for cfg.epochs; after each epoch score the dev set with ``evaluate`` and keep the best ``select``.

    Returns a summary (history, best epoch, examples/s). The model ends with the selected (or last) weights.
    Per-step loss and lr go to the --report-to backends, the curves to ``out_dir`` (default: cfg.output_dir) as
    training_curves.png (finetuning.curves).
    """
    model.to(rt.device)
    lengths = [len(f["input_ids"]) for f in features]
    targets = [_n_targets(f) for f in features]
    # Heads average their loss over the batch's labelled targets. Length-bucketed batches hold from a few dozen to
    # over a thousand labelled tokens, so that mean gives a token in a batch of short sentences many times the
    # weight of one in a batch of long ones (18x on a 1,400-sentence NER set) -- and the long sentences are where the
    # entities are. Rescaling by (targets in this batch / mean targets per batch) makes every labelled token weigh
    # the same wherever it is batched: the objective of uniformly shuffled batches, kept with bucketing's speed.
    per_batch = sum(targets) / math.ceil(len(features) / cfg.batch_size)
    per_rank = math.ceil(len(features) / cfg.batch_size) // rt.world_size
    if per_rank < 1:
        raise ValueError(f"{len(features)} training examples are fewer than one batch per rank")
    total_steps = math.ceil(cfg.epochs * per_rank)
    opt, sched = build_optimizer(model, cfg, total_steps)
    engine = None
    if rt.deepspeed:
        import deepspeed

        engine, opt, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=_deepspeed_config(cfg, rt)
        )
    out_dir = out_dir or cfg.output_dir
    tracker = curves.start_tracker(cfg, rt, out_dir, desc)
    step, seen, train_time, cpu_time = 0, 0, 0.0, 0.0
    history, best, best_state, best_epoch = [], None, None, None
    curve, every, window = [], max(1, total_steps // CURVE_POINTS), []  # the loss curve: ~CURVE_POINTS points a run
    for epoch in range(math.ceil(cfg.epochs)):
        batches = make_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=cfg.bucket_by_length)
        mine = batches[rt.rank :: rt.world_size][:per_rank]  # equal step counts on every rank
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(mine, desc=f"{desc} epoch {epoch + 1}", leave=False, disable=not (cfg.progress and rt.is_main))
        loss_sum, n_loss = 0.0, 0
        for idx in bar:
            if step >= total_steps:
                break
            batch = _to(collate([features[i] for i in idx]), rt.device)
            weight = sum(targets[i] for i in idx) / per_batch
            if engine is not None:
                loss = engine(**batch)["loss"]
                engine.backward(loss * weight)
                engine.step()
            else:
                with _autocast(cfg, rt):
                    loss = model(**batch)["loss"]
                (loss * weight).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(idx) * rt.world_size
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            window.append(loss.item())
            if tracker is not None:
                tracker.log({"train/loss": window[-1], "train/lr": sched.get_last_lr()[0],
                             "train/epoch": step / per_rank}, step)
            if step % every == 0 or step == total_steps:
                curve.append({"step": step, "epoch": round(step / per_rank, 3), "train_loss": sum(window) / len(window),
                              "lr": sched.get_last_lr()[0]})
                window = []
            if n_loss % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / n_loss:.4f}")
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, n_loss)}
        if evaluate is not None:
            scores = evaluate(model)
            record.update({k: v for k, v in scores.items() if isinstance(v, int | float)})
            if tracker is not None:
                tracker.log({f"dev/{k}": v for k, v in scores.items()}, step)
            # Ties go to the later epoch: equal dev scores (0 while a rare class is still unlearned) say nothing
            # for the earlier weights, and the later ones have trained longer.
            if best is None or scores[select] >= best:
                best = scores[select]
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                best_epoch = epoch + 1
        history.append(record)
        if rt.is_main and cfg.progress:
            print(f"[{desc}] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if best_state is not None:
        model.load_state_dict(best_state)
    result = {
        "history": history,
        "curve": curve,  # train loss (mean over the steps since the previous point) and lr by step
        "best_epoch": best_epoch or history[-1]["epoch"],
        "steps": step,
        "train_examples_seen": seen,
        "train_seconds": train_time,
        "train_examples_per_s": seen / train_time if train_time else 0.0,
        # this process's CPU time (all its threads): a speed figure other jobs on the machine do not distort
        "train_cpu_seconds": cpu_time,
    }
    if rt.is_main:
        result["plot"] = curves.plot(os.path.join(out_dir, curves.PNG), curve, history,
                                     select if evaluate is not None else None, desc).name
    if tracker is not None:
        tracker.close({k: v for k, v in result.items() if k not in ("history", "curve")})
    return result
