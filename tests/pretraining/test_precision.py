"""Mixed precision at ZeRO 0 through the real DeepSpeed engine on CPU: fp32 master parameters, bf16 autocast, clipping
and LAMB in our multi-tensor step (DeepSpeed wraps nothing), and the fp16 loss-scaling skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_fixtures as ef  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def zero0_cfg(tmp_path, precision: str, max_steps: int):
    shards = ef.synthetic_shards(tmp_path.parent)
    run = ef.tiny_run(tmp_path / "run", shards, shards, max_steps=max_steps,
                      model={"overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
                      checkpoint={"every_steps": 0}, logging={"progress_bar": False, "tensorboard": False,
                                                              "every_steps": 2})
    return ef.load_tiny(run, ["ds.zero_optimization.stage=0", f"ds.{precision}.enabled=true", "optimizer.name=lamb",
                              "optimizer.lr=0.01", "ds.train_batch_size=4", "ds.train_micro_batch_size_per_gpu=2",
                              "ds.gradient_clipping=0.05"])


def test_zero0_bf16_lamb_is_autocast_plus_our_step(tmp_path):
    """The trainer's ZeRO-0 bf16 LAMB run == a hand-written loop (autocast forward, mean over 2 micro-batches,
    clip_grad_norm_, the per-tensor reference Lamb) on the same batches: DeepSpeed only sequences the calls."""
    from pretraining import trainer
    from pretraining.optim import Lamb, param_groups

    cfg = zero0_cfg(tmp_path, "bf16", max_steps=3)
    result = trainer.main(cfg)
    summary = result["summary"]
    assert summary["optimizer"] == "ForeachLamb[foreach]" and summary["attention"] == "sdpa_padded"
    assert summary["precision"].startswith("fp32 master weights, bf16 autocast")
    assert (summary["micro_batch"], summary["grad_accum"]) == (2, 2)
    engine = result["engine"]
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert type(engine.optimizer).__name__ == "ForeachLamb"  # not wrapped by FP16_UnfusedOptimizer
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0.05 for r in result["records"])  # clipping was active

    model, _ = trainer.build_model(cfg)
    opt = Lamb(param_groups(model, cfg.optimizer.weight_decay), lr=0.01, betas=cfg.optimizer.betas,
               eps=cfg.optimizer.eps)
    loader = trainer.build_loader(cfg, model.config, Path(cfg.data.shard_dir), 0)
    batches = iter(loader)
    try:
        for _ in range(3):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(packed=next(batches)["packed"])["loss"]
                (loss / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            for group in opt.param_groups:  # the linear schedule without warmup, as the run's
                group["lr"] = 0.01 * (1 - (opt.state[group["params"][0]]["step"]) / 3)
            model.zero_grad()
    finally:
        loader.close()
    for (name, a), b in zip(model.named_parameters(), engine.module.parameters()):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-4, msg=name)


def test_fp16_overflow_skips_through_the_engine(tmp_path):
    """fp16 at ZeRO 0: the loss is scaled, an inf in one step's loss skips that step (weights, moments and the LR
    schedule untouched, engine.skipped_steps counts it, the scale drops after DeepSpeed's hysteresis), others train."""
    import deepspeed
    from test_model import make_batch, tiny_config

    from biobert import dist
    from pretraining.model import BertForPreTraining
    from pretraining.optim import build_optimizer, build_scheduler, plan_precision

    dist.init()
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    plan = plan_precision({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
                           "fp16": {"enabled": True, "initial_scale_power": 10, "hysteresis": 1},
                           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    optimizer = build_optimizer(model, "adamw", 1e-3, plan=plan)
    scheduler = build_scheduler(optimizer, 0, 10)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.ds_config)
    batch = make_batch()
    for step in range(4):
        before = [p.detach().clone() for p in engine.module.parameters()]
        scale, lr = plan.loss_scaler.scale, scheduler.get_last_lr()[0]
        with plan.autocast("cpu"):
            loss = engine(**batch)["loss"]
        if step == 2:
            loss = loss * float("inf")
        engine.backward(plan.scale_loss(loss))
        engine.step()
        changed = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        if step == 2:
            assert not changed and optimizer.overflow and engine.skipped_steps == 1
            assert plan.loss_scaler.scale == scale / 2 and scheduler.get_last_lr()[0] == lr
        else:
            assert changed and not optimizer.overflow and plan.loss_scaler.scale == scale
    assert engine.skipped_steps == 1


def test_zero0_bf16_lamb_resume_is_exact(tmp_path):
    """Our optimizer's state (per-tensor step counts, moments) goes through DeepSpeed's ZeRO-0 checkpoint: 2 steps,
    resume, 2 more == 4 straight, loss for loss and weight for weight."""
    from pretraining import trainer

    straight = trainer.main(zero0_cfg(tmp_path / "a", "bf16", max_steps=4))
    first = zero0_cfg(tmp_path / "b", "bf16", max_steps=4)
    first.max_steps = 2
    first.checkpoint.every_steps = 2
    trainer.main(first)
    resumed = trainer.main(zero0_cfg(tmp_path / "b", "bf16", max_steps=4))
    assert resumed["resumed_from"] is not None and resumed["step"] == 4
    assert ef.step_losses(tmp_path / "b" / "run") == dict(enumerate(straight["losses"], 1))
    ef.assert_same_weights(ef.weights(straight["engine"]), ef.weights(resumed["engine"]))
