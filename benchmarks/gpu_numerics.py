"""Numerics checks of benchmarks/gpu_check.py: optimizers, attention paths, fp16 loss scaling through the engine.

Each check takes a device, returns a dict with its numbers and `passed`, and records what it could not run (with the
reason) instead of failing: on CPU the optimizer and fp16 checks run in full (tests/benchmarks/test_gpu_check.py runs
them), the flash paths need CUDA. A wrong number fails the check; a missing kernel is "unavailable", never "passed".
"""

from __future__ import annotations

import torch


def tiny_config(vocab: int = 1024, dropout: float = 0.0):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=512, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


def synthetic_batch(config, batch: int, seq: int, device, padded: bool = True, seed: int = 0) -> dict:
    """Pretraining micro-batch in the loader's format; with padding, lengths vary from seq/4 to seq."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g) if padded else torch.full((batch,), seq)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    npred = max(1, seq * 15 // 100)
    pos = torch.stack([torch.sort(torch.randperm(int(n) - 1, generator=g)[:npred] + 1).values
                       if n - 1 >= npred else torch.arange(1, npred + 1).clamp(max=int(n) - 1) for n in lengths])
    return {k: v.to(device) for k, v in dict(
        input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask, masked_lm_positions=pos,
        masked_lm_ids=torch.gather(ids, 1, pos).clamp(min=5),
        next_sentence_labels=torch.randint(0, 2, (batch,), generator=g)).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------------- optimizers


def check_optimizers(device, steps: int = 6, tol: float = 2e-6) -> dict:
    """Our multi-tensor LAMB/AdamW (every kernel this machine has) against the per-tensor reference Lamb (tested
    against FusedLamb's kernel arithmetic) / torch.optim.AdamW, and against DeepSpeed's FusedLamb/FusedAdam when their
    op loads without compiling. fp32 parameters, identical gradients, relative parameter error after each step."""
    from pretraining.optim import Lamb
    from pretraining.optim_foreach import ForeachAdamW, ForeachLamb, load_deepspeed_op

    shapes = [(512, 256), (256,), (64, 512), (64,), (1000, 128), (7,)]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 * (50 if t == 3 else 1) for s in shapes] for t in range(steps)]

    def run(make) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(x.clone().to(device)) for x in init]
        opt = make([{"params": [p for p in params if p.ndim == 2], "weight_decay": 0.01},
                    {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}])
        history = []
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.to(device)
            opt.step()
            history.append([p.detach().float().cpu().clone() for p in params])
        return history

    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    candidates = {"lamb": [("reference", lambda gs: Lamb(gs, **hp)), ("foreach", lambda gs: ForeachLamb(gs, **hp))],
                  "adamw": [("reference", lambda gs: torch.optim.AdamW(gs, **hp, foreach=False)),
                            ("foreach", lambda gs: ForeachAdamW(gs, **hp)),
                            ("torch_fused", lambda gs: ForeachAdamW(gs, **hp, kernel="torch_fused"))]}
    out, passed = {}, True
    for name, ds_op, ds_make in (("lamb", "fused_lamb", lambda gs: ForeachLamb(gs, **hp, kernel="deepspeed")),
                                 ("adamw", "fused_adam", lambda gs: ForeachAdamW(gs, **hp, kernel="deepspeed"))):
        runs = candidates[name]
        if device.type == "cuda" and load_deepspeed_op(ds_op) is not None:
            runs = runs + [("deepspeed", ds_make)]
        else:
            out[f"{name}_deepspeed"] = dict(available=False, reason=f"DeepSpeed's {ds_op} op was not built at install "
                                            "time (gpu_check never JIT-compiles it)" if device.type == "cuda"
                                            else "CPU")
        ref = run(runs[0][1])
        for kernel, make in runs[1:]:
            got = run(make)
            worst = max(_rel(a, b) for step_a, step_b in zip(got, ref) for a, b in zip(step_a, step_b))
            ok = worst < tol
            out[f"{name}_{kernel}"] = dict(available=True, max_rel_param_error=worst, tolerance=tol, passed=ok)
            passed &= ok
    out["passed"] = bool(passed)
    return out


# -------------------------------------------------------------------------------------------------------- attention


def check_attention(device) -> dict:
    """Our model on its CUDA path (flash varlen, bf16 autocast) against transformers' BertModel/BertForPreTraining in
    fp32: logits, loss and parameter gradients (bf16 tolerance), and against our padded SDPA path in the same bf16
    (tighter). Then the dropout path (flash varlen with dropout_p): replayable, unbiased, and a backward that uses the
    forward's mask."""
    from benchmarks.engine_bench import hf_inputs, hf_twin
    from pretraining import attention
    from pretraining.model import BertForPreTraining

    if device.type != "cuda":
        return dict(available=False, reason="CPU: the flash paths need CUDA", passed=True)
    out = {"varlen_kernel": "torch.nn.attention.varlen" if attention.VARLEN_KERNEL is not None else None}
    if attention.VARLEN_KERNEL is None:
        out.update(available=False, passed=True, reason=f"torch {torch.__version__} has no varlen_attn (< 2.10): "
                   "training uses the padded SDPA path")
        return out
    torch.manual_seed(0)
    ours = BertForPreTraining(tiny_config()).to(device).train()
    hf = hf_twin(ours).to(device).train()
    path = ours.bert.attention_path(device, torch.bfloat16)
    out["path"] = path
    if path != "flash_varlen":
        out.update(passed=False, reason=f"varlen_attn is present but the model chose {path} (compute capability "
                   f"{torch.cuda.get_device_capability(device)})")
        return out
    cpu_batch = synthetic_batch(ours.config, 8, 256, "cpu", seed=1)
    batch = {k: v.to(device) for k, v in cpu_batch.items()}
    hf_batch = {k: v.to(device) for k, v in hf_inputs(cpu_batch).items()}
    real = batch["attention_mask"].bool()

    def run(model, bf16: bool, hf_style: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            if hf_style:
                r = model(**hf_batch)
                loss, logits = r.loss, r.prediction_logits[real]
            else:
                r = model(**batch, return_logits=True)
                loss, logits = r["loss"], r["prediction_logits"][real]
        loss.backward()
        names = ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.value.weight",
                 "bert.encoder.layer.1.output.dense.weight", "bert.embeddings.word_embeddings.weight")
        params = dict(model.named_parameters())
        return float(loss), logits.float().detach(), {n: params[n].grad.float().clone() for n in names}

    ref_loss, ref_logits, ref_grads = run(hf, False, True)
    flash_logits = flash_grads = None
    for name, use_sdpa in (("flash_varlen_bf16", False), ("sdpa_padded_bf16", True)):
        if use_sdpa:  # the fallback on the same GPU, same precision: isolates the kernel from bf16 rounding
            real_path = attention.attention_path
            attention.attention_path = lambda *a: "sdpa_padded"
        try:
            loss, logits, grads = run(ours, True, False)
        finally:
            if use_sdpa:
                attention.attention_path = real_path
        out[name] = dict(loss=loss, loss_ref_fp32=ref_loss, logits_rel_error=_rel(logits, ref_logits),
                         grad_rel_error={n: _rel(grads[n], ref_grads[n]) for n in grads})
        if use_sdpa:
            out["varlen_vs_sdpa_bf16"] = dict(logits_rel_error=_rel(flash_logits, logits),
                                              grad_rel_error={n: _rel(flash_grads[n], grads[n]) for n in grads})
        else:
            flash_logits, flash_grads = logits, grads
    f = out["flash_varlen_bf16"]
    ok = (abs(f["loss"] - ref_loss) < 0.02 * abs(ref_loss) and f["logits_rel_error"] < 2e-2
          and max(f["grad_rel_error"].values()) < 5e-2)
    vs = out["varlen_vs_sdpa_bf16"]
    ok &= vs["logits_rel_error"] < 2e-2 and max(vs["grad_rel_error"].values()) < 5e-2
    out["dropout"] = check_flash_dropout(device)
    out["passed"] = bool(ok and out["dropout"]["passed"])
    return out


def check_flash_dropout(device, p: float = 0.1) -> dict:
    """flash_varlen_dropout on packed q/k/v: (1) the same seed replays the same mask, another seed does not; (2) the
    mean over seeds approaches the no-dropout output (the 1/(1-p) scaling is right); (3) the output is linear in V
    under a fixed mask, so <dL/dV, V> == L exactly when the backward uses the forward's mask; (4) dL/dQ against a
    central difference with the mask replayed (fp16)."""
    from pretraining.attention import flash_varlen_dropout

    g = torch.Generator(device=device).manual_seed(0)
    lengths = [200, 77, 256, 31]
    N, heads, hd = sum(lengths), 4, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(N, heads, hd, device=device, generator=g, dtype=torch.float16) for _ in range(3))
    w = torch.randn(N, heads, hd, device=device, generator=g, dtype=torch.float16)
    T = max(lengths)

    def run(seed, q=q, k=k, v=v, prob=p):
        torch.manual_seed(seed)
        return flash_varlen_dropout(q, k, v, cu, T, prob)

    out = {}
    a, b, c = run(1), run(1), run(2)
    out["replay_identical"] = bool(torch.equal(a, b))
    out["other_seed_differs"] = not bool(torch.equal(a, c))
    plain = run(0, prob=0.0)
    mean = torch.stack([run(s).float() for s in range(100, 164)]).mean(0)
    out["mean_over_64_seeds_rel_error"] = _rel(mean, plain.float())
    vv = v.clone().requires_grad_(True)
    torch.manual_seed(5)
    loss = (flash_varlen_dropout(q, k, vv, cu, T, p).float() * w.float()).sum()
    loss.backward()
    loss = float(loss.detach())
    out["v_homogeneity_rel_error"] = abs(float((vv.grad.float() * v.float()).sum()) - loss) / abs(loss)
    d = torch.randn(q.shape, device=device, generator=g, dtype=torch.float16)

    def directional_error(prob: float, h: float = 0.05) -> float:
        """|central difference - <dL/dQ, d>| / |<dL/dQ, d>|, the mask replayed by reseeding before each forward."""
        def loss_at(x, grad=False):
            torch.manual_seed(6)
            x = x.clone().requires_grad_(grad)
            value = (flash_varlen_dropout(x, k, v, cu, T, prob).float() * w.float()).sum()
            if grad:
                value.backward()
                return float((x.grad.float() * d.float()).sum())
            return float(value)

        analytic = loss_at(q, grad=True)
        numeric = (loss_at((q.float() + h * d.float()).half()) - loss_at((q.float() - h * d.float()).half())) / (2 * h)
        return abs(numeric - analytic) / max(abs(analytic), 1e-6)

    out["dq_directional_rel_error"] = directional_error(p)
    out["dq_directional_rel_error_no_dropout"] = directional_error(0.0)  # the method's own noise, for scale
    out["passed"] = bool(out["replay_identical"] and out["other_seed_differs"]
                         and out["mean_over_64_seeds_rel_error"] < 0.1 and out["v_homogeneity_rel_error"] < 1e-2
                         and out["dq_directional_rel_error"] < max(0.15, 3 * out["dq_directional_rel_error_no_dropout"]))
    return out


# --------------------------------------------------------------------------------------------------- fp16 skipping


def check_fp16_loss_scaling(device, steps: int = 6, inject_at: int = 3) -> dict:
    """A DeepSpeed engine with the trainer's fp16 plan (ZeRO 0: autocast fp16, our step scales and clips) and an inf
    injected into one step's loss: that step is skipped (weights unchanged, engine.skipped_steps counts it, the LR
    schedule does not advance, the scale drops after DeepSpeed's hysteresis of 2 overflows), the others train, and the
    trainer's loss-scale accessor reads a number (for ours and for DeepSpeed's own fp16 wrapper)."""
    import deepspeed

    from biobert import dist
    from pretraining.model import BertForPreTraining
    from pretraining.optim import build_optimizer, build_scheduler, plan_precision
    from pretraining.trainer import _loss_scale

    if device.type == "cpu":
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init()
    torch.manual_seed(0)
    config = tiny_config()
    model = BertForPreTraining(config).to(device).train()
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "gradient_clipping": 1.0, "fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 1000},
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    plan = plan_precision(ds)
    optimizer = build_optimizer(model, "adamw", 1e-3, device_type=device.type, plan=plan)
    scheduler = build_scheduler(optimizer, 0, 100)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.ds_config)
    log = []
    for step in range(steps):
        batch = synthetic_batch(config, 4, 64, device, seed=step)
        before = [p.detach().clone() for p in engine.module.parameters()]
        scale, lr = _loss_scale(engine.optimizer), scheduler.get_last_lr()[0]
        with plan.autocast(device.type):
            loss = engine(**batch)["loss"]
        if step in (inject_at, inject_at + 1):
            loss = loss * float("inf")  # what an fp16 overflow in the forward looks like to the scaler
        engine.backward(plan.scale_loss(loss))
        engine.step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))
        log.append(dict(step=step, loss=float(loss.detach()), scale_before=scale, scale_after=_loss_scale(engine.optimizer),
                        lr_before=lr, lr_after=scheduler.get_last_lr()[0], weights_changed=changed,
                        skipped_total=int(engine.skipped_steps)))
    injected = [log[inject_at], log[inject_at + 1]]
    passed = (engine.skipped_steps == 2 and not any(r["weights_changed"] for r in injected)
              and all(r["lr_after"] == r["lr_before"] for r in injected)
              and injected[0]["scale_after"] == injected[0]["scale_before"]  # hysteresis 2: the first one is absorbed
              and injected[1]["scale_after"] == injected[1]["scale_before"] / 2
              and all(r["weights_changed"] for i, r in enumerate(log) if i not in (inject_at, inject_at + 1))
              and all(isinstance(r["scale_before"], float) for r in log))
    result = dict(steps=log, skipped_steps=int(engine.skipped_steps), optimizer=optimizer.implementation)
    if device.type == "cuda":  # DeepSpeed's own fp16 wrapper (what the HF baseline runs): the accessor reads its scale
        other = BertForPreTraining(config).to(device)
        ds_engine, *_ = deepspeed.initialize(model=other, optimizer=build_optimizer(other, "adamw", 1e-3,
                                                                                  device_type="cuda"), config=ds)
        result["deepspeed_fp16_wrapper"] = dict(type=type(ds_engine.optimizer).__name__,
                                                loss_scale=_loss_scale(ds_engine.optimizer))
        passed &= isinstance(result["deepspeed_fp16_wrapper"]["loss_scale"], float)
    result["passed"] = bool(passed)
    return result

