"""The pretraining engine: build (model, data, optimizer, DeepSpeed engine), resume, train, checkpoint. ``main(cfg)``.

One optimizer step = ``grad_accum`` micro-batches through ``engine.forward/backward/step`` (DeepSpeed owns the
accumulation boundary, loss scaling, clipping, ZeRO and the LR scheduler step), then ONE small all-reduce that carries
the step's metrics and the stop/save decisions, so every rank always takes the same branch (a rank that got SIGTERM
cannot start a save alone and deadlock the others). The reduced loss goes through numerics.NumericsMonitor (NaN stop,
fp16 overflow count, spike flag); signals are a flag (pretraining.preemption). Failure behaviour: docs/reliability.md.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from pretraining import checkpoint as ckpt
from pretraining import distributed as dist
from pretraining import numerics, preemption, warm_start
from pretraining.config import PRESETS, RunConfig
from pretraining.metrics import MetricsLogger, batch_flops, device_name, peak_tflops

log = logging.getLogger(__name__)

# Exit code after a SIGTERM/SIGUSR1-triggered checkpoint (EX_TEMPFAIL: "try again later"): requeue the job and it
# resumes from that checkpoint. 0 = finished, anything else = failure.
EXIT_PREEMPTED = 75

# slots of the per-step all-reduce
_LOSS, _MLM, _NSP, _CORRECT, _COUNT, _TOKENS, _SAMPLES, _FLOPS, _STOP, _SAVE_DUE, _N = range(11)
_LOSS_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count")  # model outputs, in slots 0..4


def _loss_scale(optimizer) -> float | None:
    """fp16 dynamic loss scale: ZeRO optimizers expose cur_scale, the non-ZeRO fp16 optimizer keeps it in a config."""
    for holder in (optimizer, getattr(optimizer, "loss_scale_config", None), getattr(optimizer, "loss_scaler", None)):
        value = getattr(holder, "cur_scale", None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def build_model(cfg: RunConfig):
    """-> (model, tokenizer dir). Continued pretraining from an HF dir, or a preset from scratch (seeded)."""
    from pretraining.hub import resolve_model_dir
    from pretraining.model import BertForPreTraining, load_pretrained

    m = cfg.model
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    if m.init:
        model_dir = resolve_model_dir(m.init)
        model = load_pretrained(model_dir, **m.overrides).train()
        return model, Path(m.tokenizer) if m.tokenizer else model_dir
    from transformers import BertConfig

    from data_prep.contract import read_vocab_tokens

    tokenizer = Path(m.tokenizer) if m.tokenizer else resolve_model_dir("minilm")
    config = BertConfig(vocab_size=len(read_vocab_tokens(tokenizer)), **{**PRESETS[m.preset], **m.overrides})
    return BertForPreTraining(config).train(), tokenizer


def special_token_ids(tokenizer_dir) -> list[int]:
    from data_prep.contract import read_vocab_tokens

    vocab = {t: i for i, t in enumerate(read_vocab_tokens(tokenizer_dir))}
    return [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]


def build_loader(cfg: RunConfig, model_config, tokenizer_dir, start_sample: int, exclude=()):
    from data_prep.contract import read_vocab_tokens
    from pretraining.data import PretrainingLoader

    world = dist.world_size()
    vocab = {t: i for i, t in enumerate(read_vocab_tokens(tokenizer_dir))}
    special = special_token_ids(tokenizer_dir)
    return PretrainingLoader(
        cfg.data.shard_dir, micro_batch_size=cfg.batch.micro(world), grad_accum_steps=cfg.grad_accum(world),
        rank=dist.rank(), world_size=world, seed=cfg.seed, start_sample=start_sample,
        masked_lm_prob=cfg.data.masked_lm_prob, max_predictions=cfg.data.max_predictions,
        vocab_size=model_config.vocab_size, special_token_ids=special, mask_token_id=vocab.get("[MASK]"),
        prefetch=cfg.data.prefetch, skip_bad_shards=cfg.data.skip_bad_shards, exclude_shards=exclude,
        pin_memory=True)  # only takes effect on CUDA: lets the .to(device, non_blocking=True) copies overlap


def preflight(cfg: RunConfig, model_config, tokenizer_dir) -> list[str]:
    """Vocab and shard checks before any step. Verification is split across ranks and the findings all-gathered, so
    every rank raises the same error. Returns the bad shard files when data.skip_bad_shards allows going on."""
    from pretraining.data import check_vocab, verify_shards
    from pretraining.data_shards import load_manifest

    manifest = load_manifest(cfg.data.shard_dir)
    check_vocab(manifest, tokenizer_dir, model_config.vocab_size)
    if not cfg.data.verify:
        return []
    mine = verify_shards(cfg.data.shard_dir, manifest, range(dist.rank(), len(manifest.shards), dist.world_size()),
                         vocab_size=model_config.vocab_size)
    errors = [e for part in dist.all_gather_object([(getattr(e, "file", ""), str(e)) for e in mine]) for e in part]
    if errors and not cfg.data.skip_bad_shards:
        raise ValueError(f"shard verification failed in {cfg.data.shard_dir} (nothing was trained):\n  "
                         + "\n  ".join(msg for _, msg in errors))
    for _, msg in errors:
        log.warning("skipping bad shard: %s", msg)
    return sorted({f for f, _ in errors})


def main(cfg: RunConfig, on_step=None, on_micro=None) -> dict:
    """Train to cfg.max_steps (or until SIGTERM/SIGUSR1). Test hooks: ``on_step(step, engine)`` before each step,
    ``on_micro(step, micro_index, sample_ids, engine)`` before each micro-batch's forward."""
    # A signal that arrived before this call (run.py installs the handler before the heavy imports) is kept:
    # it stops the run at the first step boundary. The flag is consumed when we return.
    previous = preemption.install()
    try:
        return _train(cfg, on_step, on_micro)
    finally:
        preemption.restore(previous)
        preemption.clear()


def _train(cfg: RunConfig, on_step, on_micro) -> dict:
    import deepspeed

    from pretraining.optim import build_optimizer, build_scheduler

    env = dist.init()
    rank, world = env.rank, env.world_size
    accum, micro = cfg.grad_accum(world), cfg.batch.micro(world)
    global_batch = micro * accum * world
    # our optimizer goes in as a client optimizer; ZeRO only accepts those it was tested with unless told otherwise
    ds_config = {"zero_allow_untested_optimizer": True, **cfg.deepspeed, **cfg.batch.resolved(world)}
    device = dist.device()

    model, tokenizer_dir = build_model(cfg)
    bad_shards = preflight(cfg, model.config, tokenizer_dir)

    resume_from = None
    if cfg.checkpoint.resume == "auto":  # rank 0 alone looks (and cleans up), everyone gets its answer
        found = None
        if rank == 0:
            ckpt.discard_incomplete(cfg.checkpoint_dir)
            found = ckpt.latest_complete(cfg.checkpoint_dir)
        resume_from = dist.broadcast_object(found)
    elif cfg.checkpoint.resume != "never":
        resume_from = ckpt.resolve(cfg.checkpoint.resume)
    elif ckpt.scan(cfg.checkpoint_dir)[0]:  # a fresh run would overwrite another run's checkpoints and metrics
        raise ValueError(f"checkpoint.resume=never but {cfg.checkpoint_dir} already holds complete checkpoints of "
                         "another run: use a new output_dir (or resume=auto to continue that run)")

    universal = False  # a checkpoint from another world size / ZeRO stage, converted on load (opt-in)
    if resume_from is not None and cfg.checkpoint.reshard == "universal":
        meta = ckpt.read_marker(resume_from)
        universal = (meta["world_size"], meta["zero_stage"]) != (world, cfg.zero_stage)
        if universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}

    o, s = cfg.optimizer, cfg.schedule
    head_warmup, fresh = warm_start.resolve_head_warmup(cfg, model)
    mlm_bias = warm_start.init_mlm_bias(cfg, model, special_token_ids(tokenizer_dir)) if resume_from is None else None
    if head_warmup and rank == 0:
        log.warning("head warm-up: steps 1-%d train only the %d fresh parameters %s (lr %g), the weights loaded from "
                    "%s stand still (model.head_warmup_steps=%s); then the whole model trains with its own %d-step "
                    "warmup", head_warmup, len(fresh), sorted(fresh), o.lr, cfg.model.init,
                    cfg.model.head_warmup_steps, s.warmup_steps)
    optimizer = build_optimizer(model, o.name, o.lr, o.betas, o.eps, o.weight_decay, device_type=device.type,
                                fresh=fresh)
    scheduler = build_scheduler(optimizer, s.warmup_steps, s.total_steps, s.kind, s.power, head_warmup)
    fresh_group = next((i for i, g in enumerate(optimizer.param_groups) if g["fresh"]), None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    # A different dropout stream per rank; a resumed run restores the saved streams instead.
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + 1000 + rank)

    step, consumed = 0, cfg.data.start_sample  # consumed: global samples, the data position
    if resume_from is not None:
        # DeepSpeed restores optimizer, scheduler, skipped-step count; ckpt.load this rank's RNG streams
        state = ckpt.load(engine, resume_from, universal=universal)
        step, consumed = state["step"], state["samples_consumed"]
        if state["global_batch_size"] != global_batch:
            raise ValueError(f"{resume_from} was trained with global batch {state['global_batch_size']}, this run "
                             f"has {global_batch}: the data position and schedule would not line up")
        if rank == 0:
            log.warning("resumed from %s at step %d (%d samples consumed)", resume_from, step, consumed)
    elif consumed % global_batch:
        raise ValueError(f"data.start_sample {consumed} is not a multiple of the global batch {global_batch}: "
                         "use the samples_consumed of a checkpoint")
    loader = build_loader(cfg, model.config, tokenizer_dir, consumed, exclude=bad_shards)
    batches = iter(loader)

    peak, peak_source = peak_tflops(device_name(), cfg.precision, cfg.logging.peak_tflops)
    metrics = MetricsLogger(cfg.output_dir, active=rank == 0, start_step=step, max_steps=cfg.max_steps, peak=peak,
                            peak_source=peak_source, every_steps=cfg.logging.every_steps,
                            progress_bar=cfg.logging.progress_bar, tensorboard=cfg.logging.tensorboard)
    n = cfg.numerics
    monitor = numerics.NumericsMonitor(fp16=cfg.precision == "fp16", skipped_steps=engine.skipped_steps,
                                       spike_factor=n.spike_factor, spike_window=n.spike_window,
                                       spike_min_history=n.spike_min_history, max_overflow_streak=n.max_overflow_streak)
    losses, last_saved, saved_at_time, stopped = [], None, time.monotonic(), False
    try:
        while step < cfg.max_steps and not stopped:
            if on_step is not None:
                on_step(step + 1, engine)
            t0, data_wait, lrs = time.perf_counter(), 0.0, scheduler.get_last_lr()
            stats = torch.zeros(_N, dtype=torch.float64)
            micro_losses, micro_ids = [], []  # per micro-batch, kept on device: no host sync per micro
            for i in range(accum):
                t = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - t
                micro_ids.append(batch.pop("sample_ids"))
                if on_micro is not None:
                    on_micro(step + 1, i, micro_ids[-1], engine)
                stats[_TOKENS] += batch["attention_mask"].sum()
                stats[_SAMPLES] += len(micro_ids[-1])
                stats[_FLOPS] += batch_flops(model.config, batch["attention_mask"], batch["masked_lm_positions"])
                out = engine(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
                engine.backward(out["loss"])
                engine.step()
                micro_losses.append(torch.stack([out[key].detach().double() for key in _LOSS_KEYS]))
            step += 1
            consumed += global_batch
            stats[: len(_LOSS_KEYS)] = torch.stack(micro_losses).sum(0).cpu()
            stats[_STOP] = float(preemption.requested())
            every_min = cfg.checkpoint.every_minutes
            stats[_SAVE_DUE] = float(rank == 0 and every_min > 0 and time.monotonic() - saved_at_time >= every_min * 60)
            stats = dist.all_reduce_sum(stats.to(device)).cpu()  # the only collective we add per step
            loss = float(stats[_LOSS]) / (accum * world)
            verdict, health = monitor.update(step, loss, engine.skipped_steps)
            if verdict == numerics.STOP:  # every rank sees the same reduced loss: all raise, none is left waiting
                _raise_nonfinite(cfg, step, monitor.reason, micro_losses, micro_ids, loader.manifest)
            losses.append(loss)
            scale = _loss_scale(engine.optimizer) if cfg.precision == "fp16" else None
            grad_norm = engine.get_global_grad_norm()
            metrics.log(step, dict(
                loss=loss, mlm_loss=float(stats[_MLM]) / (accum * world), nsp_loss=float(stats[_NSP]) / (accum * world),
                mlm_acc=float(stats[_CORRECT]) / max(float(stats[_COUNT]), 1.0), lr=lrs[0],
                **({} if fresh_group is None else dict(lr_heads=lrs[fresh_group], head_warmup=step <= head_warmup)),
                grad_norm=None if grad_norm is None else float(grad_norm), loss_scale=scale, **health,
                samples=float(stats[_SAMPLES]), tokens=float(stats[_TOKENS]), flops=float(stats[_FLOPS]),
                step_time=time.perf_counter() - t0, data_wait=data_wait,
                compute_time=time.perf_counter() - t0 - data_wait, samples_consumed=consumed))
            stopped = bool(stats[_STOP] > 0) and step < cfg.max_steps  # a signal in the last step: just finish
            every = cfg.checkpoint.every_steps
            if stopped or stats[_SAVE_DUE] > 0 or step == cfg.max_steps or (every and step % every == 0):
                last_saved = _save(cfg, engine, step, consumed, global_batch, model.config, tokenizer_dir)
                saved_at_time = time.monotonic()
                if not stopped and step < cfg.max_steps:  # signalled during the save: it is finished, stop now
                    stopped = bool(dist.all_reduce_sum(torch.tensor([float(preemption.requested())], device=device)))
    finally:
        loader.close()
    summary = metrics.summary(final_step=step, skipped_steps=engine.skipped_steps,
                              bad_shards=len(bad_shards), preempted=stopped, head_warmup_steps=head_warmup,
                              mlm_bias_init=mlm_bias)
    metrics.close(summary)
    dist.barrier()
    return dict(losses=losses, step=step, samples_consumed=consumed, checkpoint=last_saved,
                resumed_from=resume_from, preempted=stopped, exit_code=EXIT_PREEMPTED if stopped else 0,
                summary=summary, records=metrics.records, engine=engine)


def _save(cfg: RunConfig, engine, step: int, consumed: int, global_batch: int, model_config, tokenizer_dir):
    client = dict(step=step, samples_consumed=consumed, global_batch_size=global_batch,
                  overflow_steps_skipped=engine.skipped_steps, loader_start_sample=consumed, run_config=cfg.to_dict())
    return ckpt.save(engine, cfg.checkpoint_dir, step, client, hf_config=model_config, tokenizer_dir=tokenizer_dir,
                     keep_last=cfg.checkpoint.keep_last)


def _raise_nonfinite(cfg: RunConfig, step: int, reason: str, micro_losses, micro_ids, manifest) -> None:
    """Collective (every rank calls it): gather each rank's micro-batch losses and sample ids, raise naming them."""
    report = dict(rank=dist.rank(), losses=[float(x[0]) for x in micro_losses],
                  sample_ids=[ids.tolist() for ids in micro_ids])
    reports = dist.all_gather_object(report)
    raise FloatingPointError(numerics.nonfinite_message(step, reason, reports, cfg.data.shard_dir, manifest))
