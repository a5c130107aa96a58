"""The pretraining engine: build (model, data, optimizer, DeepSpeed engine), resume, train, checkpoint. ``main(cfg)``.

One optimizer step = ``grad_accum`` micro-batches through ``engine.forward/backward/step`` (DeepSpeed owns the
accumulation boundary, ZeRO and the LR scheduler step; precision, clipping and fp16 loss scaling belong to our
optimizer step at ZeRO 0 and to DeepSpeed's ZeRO optimizer above it: pretraining.optim.plan_precision).

No host sync inside a step: batches arrive packed and pinned from the loader thread and are copied non_blocking; the
step's losses accumulate on the device. After each step ONE tiny all-reduce on a CPU (gloo) group carries the
stop/save decisions and the host-side counts (tokens, samples, FLOPs), so every rank always takes the same branch (a
rank that got SIGTERM cannot start a save alone and deadlock the others) without touching the CUDA stream. The
device-side metrics of the steps since the last flush are all-reduced and read once per ``logging.every_steps`` (and
before every checkpoint and at the end), then go through numerics.NumericsMonitor (NaN stop, fp16 overflow count,
spike flag) step by step: a non-finite loss still stops the run before anything is checkpointed. Per-step times in
metrics.jsonl are the flush interval's wall time divided by its steps (the GPU runs ahead of the host in between).
Signals are a flag (pretraining.preemption). Failure behaviour: docs/reliability.md.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biobert import dist, tracking
from biobert.errors import UserError
from pretraining import checkpoint as ckpt
from pretraining import numerics, preemption, run_record, shared_dir, warm_start
from pretraining.config import PRESETS, RunConfig
from pretraining.evaluation import Validator
from pretraining.metrics import MetricsLogger, batch_flops, device_name, peak_tflops
from pretraining.sample_log import SampleIdLog

log = logging.getLogger(__name__)

# Exit code after a SIGTERM/SIGUSR1-triggered checkpoint (EX_TEMPFAIL: "try again later"): requeue the job and it
# resumes from that checkpoint. 0 = finished, anything else = failure.
EXIT_PREEMPTED = 75

# device-side metrics of a step (model outputs summed over micro-batches), all-reduced at a flush
_DEVICE_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct")
# slots of the per-step host (gloo) all-reduce
_STOP, _SAVE_DUE, _TOKENS, _SAMPLES, _FLOPS, _COUNT, _NHOST = range(7)


def _loss_scale(optimizer) -> float | None:
    """fp16 loss scale: ours (loss_scaler.scale), DeepSpeed ZeRO's cur_scale, or DeepSpeed's fp16 wrappers'
    loss_scale_config.cur_scale."""
    for holder in (optimizer, getattr(optimizer, "loss_scale_config", None), getattr(optimizer, "loss_scaler", None)):
        for name in ("cur_scale", "scale"):
            value = getattr(holder, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _host_group():
    """(group, device) for the per-step flags: a gloo group on the CPU when the default backend is not gloo, so the
    all-reduce neither waits for the CUDA stream nor makes the host wait for it. If gloo cannot connect (set
    GLOO_SOCKET_IFNAME to the interface NCCL uses), the default group carries them: correct, one sync per step."""
    if dist.world_size() == 1:
        return None, None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD, torch.device("cpu")
    try:
        return torch.distributed.new_group(backend="gloo"), torch.device("cpu")
    except Exception as e:  # noqa: BLE001 - any failure to build the side group: fall back, loudly
        log.warning("no gloo group for the per-step flags (%s: %s); using the default group (a host sync per step)",
                    type(e).__name__, e)
        return None, dist.device()


def _host_all_reduce(values: list[float], group) -> list[float]:
    group, device = group
    if device is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return t.tolist()


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
        pin_memory=True,  # only takes effect on CUDA: lets the .to(device, non_blocking=True) copies overlap
        pack=True)  # the unpadded layout is computed in the loader thread, not in the step


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


def main(cfg: RunConfig, on_step=None, on_micro=None, step_guard=None, command: list[str] | None = None) -> dict:
    """Train to cfg.max_steps (or until SIGTERM/SIGUSR1). Test hooks: ``on_step(step, engine)`` before each step,
    ``on_micro(step, micro_index, sample_ids, engine)`` before each micro-batch's forward, ``step_guard(step)``: a
    context manager around a step's micro-batches (benchmarks/gpu_check.py: CUDA sync debug mode "error").
    ``command``: the command line that started the run, for the run record, checkpoints and the model card."""
    # A signal that arrived before this call (run.py installs the handler before the heavy imports) is kept:
    # it stops the run at the first step boundary. The flag is consumed when we return.
    previous = preemption.install()
    try:
        return _train(cfg, on_step, on_micro, step_guard, command)
    finally:
        preemption.restore(previous)
        preemption.clear()


def _train(cfg: RunConfig, on_step, on_micro, step_guard, command) -> dict:
    import contextlib

    import deepspeed

    from pretraining.optim import build_optimizer, build_scheduler, plan_precision

    backends = cfg.logging.backends()
    tracking.check_installed(backends, "logging.report_to")  # every rank: all stop, none waits for rank 0
    env = dist.init()
    rank, world = env.rank, env.world_size
    shared_dir.check(cfg.output_dir)  # one directory for every rank, or every rank stops here naming the nodes
    accum, micro = cfg.grad_accum(world), cfg.batch.micro(world)
    global_batch = micro * accum * world
    device = dist.device()

    model, tokenizer_dir = build_model(cfg)
    # precision, clipping and loss scaling: ours at ZeRO 0 (no DeepSpeed wrapper around the client optimizer),
    # DeepSpeed's ZeRO optimizer above it (pretraining.optim.plan_precision)
    plan = plan_precision(cfg.deepspeed_dict(world, model.config.hidden_size))
    ds_config = plan.ds_config
    bad_shards = preflight(cfg, model.config, tokenizer_dir)
    validator = Validator.from_config(cfg, model.config, tokenizer_dir, plan, device)  # None: no validation data

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
                                plan=plan, fresh=fresh)
    scheduler = build_scheduler(optimizer, s.warmup_steps, s.total_steps, s.kind, s.power, head_warmup)
    fresh_group = next((i for i, g in enumerate(optimizer.param_groups) if g["fresh"]), None)
    if cfg.model.compile:
        model.bert.compile_layers()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    host_group = _host_group()
    act_dtype = plan.autocast_dtype or next(engine.module.parameters()).dtype
    run_info = dict(attention=model.bert.attention_path(device, act_dtype),
                    optimizer=getattr(optimizer, "implementation", type(optimizer).__name__),
                    precision=plan.describe(), compiled=bool(cfg.model.compile), micro_batch=micro, grad_accum=accum,
                    world_size=world)
    if rank == 0:
        log.warning("run: %s", " | ".join(f"{k} {v}" for k, v in run_info.items()))
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
    if validator is not None:
        run_info["validation"] = validator.describe()
    if rank == 0:
        if validator is not None:
            log.warning("validation: %s, after every %s step(s)%s", validator.describe(),
                        cfg.eval.every_steps or "no", " and at the end" if cfg.eval.at_end else "")
        run_record.write(cfg.output_dir, cfg, ds_config, world_size=world, launcher=env.launcher, step=step,
                         resumed_from=resume_from, run_info=run_info, command=command,
                         validation=validator.describe() if validator is not None else None)
    metrics = _metrics_logger(cfg, rank, step, backends)
    loader = build_loader(cfg, model.config, tokenizer_dir, consumed, exclude=bad_shards)
    batches = iter(loader)
    id_log = SampleIdLog(cfg.output_dir, rank, step) if cfg.data.log_sample_ids else None
    n = cfg.numerics
    monitor = numerics.NumericsMonitor(fp16=cfg.precision == "fp16", skipped_steps=engine.skipped_steps,
                                       spike_factor=n.spike_factor, spike_window=n.spike_window,
                                       spike_min_history=n.spike_min_history, max_overflow_streak=n.max_overflow_streak)
    losses, last_saved, saved_at_time, stopped = [], None, time.monotonic(), False
    pending: list[dict] = []  # steps since the last flush, their device metrics not yet read
    interval_start = time.perf_counter()
    try:
        while step < cfg.max_steps and not stopped:
            if on_step is not None:
                on_step(step + 1, engine)
            data_wait, lrs = 0.0, scheduler.get_last_lr()
            host = [0.0] * _NHOST
            device_sum, micro_losses, micro_ids = None, [], []  # kept on device: no host sync per micro or step
            with step_guard(step + 1) if step_guard is not None else contextlib.nullcontext():
                for i in range(accum):
                    t = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - t
                    micro_ids.append(batch.pop("sample_ids"))
                    if id_log is not None:
                        id_log.write(step + 1, i, micro_ids[-1])
                    if on_micro is not None:
                        on_micro(step + 1, i, micro_ids[-1], engine)
                    packed = batch["packed"]
                    host[_TOKENS] += packed.tokens
                    host[_SAMPLES] += packed.batch
                    host[_COUNT] += packed.masked
                    host[_FLOPS] += batch_flops(model.config, batch["attention_mask"], batch["masked_lm_positions"])
                    with plan.autocast(device.type):
                        out = engine(packed=packed.to(device, non_blocking=True))
                    engine.backward(plan.scale_loss(out["loss"]))
                    engine.step()
                    values = torch.stack([out[key].detach().float() for key in _DEVICE_KEYS])
                    device_sum = values if device_sum is None else device_sum + values
                    micro_losses.append(values[0])
            step += 1
            consumed += global_batch
            every_min = cfg.checkpoint.every_minutes
            host[_STOP] = float(preemption.requested())
            host[_SAVE_DUE] = float(rank == 0 and every_min > 0 and time.monotonic() - saved_at_time >= every_min * 60)
            host = _host_all_reduce(host, host_group)  # flags + counts on the CPU group: the CUDA stream runs on
            norm = engine.get_global_grad_norm()  # ours: a device tensor, the same on every rank (reduced grads)
            if isinstance(norm, torch.Tensor):
                device_sum, norm = torch.cat([device_sum, norm.detach().float().reshape(1)]), "device"
            heads = {} if fresh_group is None else dict(lr_heads=lrs[fresh_group], head_warmup=step <= head_warmup)
            pending.append(dict(step=step, device=device_sum, host=host, lr=lrs[0], heads=heads, grad_norm=norm,
                                data_wait=data_wait,
                                skipped=engine.skipped_steps, micro_losses=micro_losses, micro_ids=micro_ids,
                                samples_consumed=consumed,
                                loss_scale=_loss_scale(engine.optimizer) if cfg.precision == "fp16" else None))
            stopped = host[_STOP] > 0 and step < cfg.max_steps  # a signal in the last step: just finish
            every = cfg.checkpoint.every_steps
            save = stopped or host[_SAVE_DUE] > 0 or step == cfg.max_steps or (every and step % every == 0)
            first = len(losses) + len(pending) == 1  # the warm-up (compilation) step: its own interval
            # from the step number alone: every rank evaluates at the same steps, a resumed run at the same ones
            evaluate = validator is not None and cfg.eval.due(step, cfg.max_steps)
            if save or first or evaluate or step % cfg.logging.every_steps == 0:
                for rec in _flush(pending, interval_start, accum * world):  # one read of the device
                    verdict, health = monitor.update(rec["step"], rec["loss"], rec.pop("skipped"))
                    if verdict == numerics.STOP:  # every rank sees the same reduced loss: all raise, none is left waiting
                        _raise_nonfinite(cfg, rec["step"], monitor.reason, rec["micro_losses"], rec["micro_ids"],
                                         loader.manifest)
                    losses.append(rec["loss"])
                    del rec["micro_losses"], rec["micro_ids"]
                    if evaluate and rec["step"] == step:  # before the save: a checkpoint at N implies N's figures
                        rec["validation"] = validator(engine)
                    metrics.log(rec.pop("step"), {**rec, **health})
                pending, interval_start = [], time.perf_counter()
            if save:
                last_saved = _save(cfg, engine, step, consumed, global_batch, model.config, tokenizer_dir, command)
                saved_at_time = time.monotonic()
                if not stopped and step < cfg.max_steps:  # signalled during the save: it is finished, stop now
                    stopped = _host_all_reduce([float(preemption.requested())], host_group)[0] > 0
                interval_start = time.perf_counter()  # the save is not training time
    finally:
        loader.close()
        if id_log is not None:
            id_log.close()
    summary = metrics.summary(final_step=step, skipped_steps=engine.skipped_steps,
                              bad_shards=len(bad_shards), preempted=stopped, head_warmup_steps=head_warmup,
                              mlm_bias_init=mlm_bias, **run_info)
    metrics.close(summary, finished=not stopped)
    dist.barrier()
    return dict(losses=losses, step=step, samples_consumed=consumed, checkpoint=last_saved,
                resumed_from=resume_from, preempted=stopped, exit_code=EXIT_PREEMPTED if stopped else 0,
                summary=summary, records=metrics.records, engine=engine)


def _flush(pending: list[dict], interval_start: float, micro_batches: int) -> list[dict]:
    """Reduce the pending steps' device metrics over ranks in one all-reduce, read them in one copy, and turn every
    step into a metrics record (step time: the interval's wall time split evenly over its steps)."""
    k = len(_DEVICE_KEYS)
    width = max(p["device"].numel() for p in pending)  # k, or k + 1 with the gradient norm
    device = torch.stack([F.pad(p["device"], (0, width - p["device"].numel())) for p in pending])
    summed = dist.all_reduce_sum(device[:, :k].contiguous())  # the norm column is not summed: every rank has it
    values = torch.cat([summed, device[:, k:]], 1).double().cpu().tolist()
    step_time = (time.perf_counter() - interval_start) / len(pending)
    micro_losses = torch.stack([x for p in pending for x in p["micro_losses"]]).cpu().tolist()
    records, j = [], 0
    for p, row in zip(pending, values):
        loss, mlm, nsp, correct = row[:4]
        host = p["host"]
        norm = row[k] if p["grad_norm"] == "device" else p["grad_norm"]
        n_micro = len(p["micro_losses"])
        records.append(dict(
            step=p["step"], loss=loss / micro_batches, mlm_loss=mlm / micro_batches, nsp_loss=nsp / micro_batches,
            mlm_acc=correct / max(host[_COUNT], 1.0), lr=p["lr"], **p["heads"], grad_norm=None if norm is None else float(norm),
            loss_scale=p["loss_scale"], samples=host[_SAMPLES], tokens=host[_TOKENS], flops=host[_FLOPS],
            step_time=step_time, data_wait=p["data_wait"], compute_time=step_time - p["data_wait"],
            samples_consumed=p["samples_consumed"], skipped=p["skipped"],
            micro_losses=micro_losses[j:j + n_micro], micro_ids=p["micro_ids"]))
        j += n_micro
    return records


def _metrics_logger(cfg: RunConfig, rank: int, step: int, backends: list[str]) -> MetricsLogger:
    """Rank 0's logger and its report_to backends. A backend that cannot start (a server refusing, a login missing)
    stops every rank with rank 0's message, before step 1."""
    peak, peak_source = peak_tflops(device_name(), cfg.precision, cfg.logging.peak_tflops)
    lg = cfg.logging
    problem, metrics = None, None
    try:
        metrics = MetricsLogger(cfg.output_dir, active=rank == 0, start_step=step, max_steps=cfg.max_steps, peak=peak,
                                peak_source=peak_source, every_steps=lg.every_steps, progress_bar=lg.progress_bar,
                                report_to=backends, tracking=dict(config=cfg.to_dict(), project=lg.project,
                                                                  run_name=lg.run_name, tracking_uri=lg.tracking_uri))
    except UserError as e:
        problem = str(e)
    problem = dist.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return metrics


def _save(cfg: RunConfig, engine, step: int, consumed: int, global_batch: int, model_config, tokenizer_dir,
          command=None):
    client = dict(step=step, samples_consumed=consumed, global_batch_size=global_batch,
                  overflow_steps_skipped=engine.skipped_steps, loader_start_sample=consumed, run_config=cfg.to_dict(),
                  command=command)
    return ckpt.save(engine, cfg.checkpoint_dir, step, client, hf_config=model_config, tokenizer_dir=tokenizer_dir,
                     keep_last=cfg.checkpoint.keep_last)


def _raise_nonfinite(cfg: RunConfig, step: int, reason: str, micro_losses, micro_ids, manifest) -> None:
    """Collective (every rank calls it): gather each rank's micro-batch losses and sample ids, raise naming them."""
    report = dict(rank=dist.rank(), losses=[float(x) for x in micro_losses],
                  sample_ids=[ids.tolist() for ids in micro_ids])
    reports = dist.all_gather_object(report)
    raise FloatingPointError(numerics.nonfinite_message(step, reason, reports, cfg.data.shard_dir, manifest))
