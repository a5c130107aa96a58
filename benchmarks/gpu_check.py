"""CUDA-only paths, verified on any machine with one NVIDIA GPU; results to a JSON file.

    biobert gpu-check [--output gpu_check.json] [--skip-benchmark] [--bench-steps 10]

Checks (each records its numbers and passed: true/false):
  lamb_numerics    DeepSpeed FusedLamb vs our pure-PyTorch Lamb (pretraining/optim.py): same model, same gradients,
                   several steps; max relative parameter difference.
  fp16_loss_scale  a short DeepSpeed fp16 engine run of our model with an inf injected into one step's loss: that step
                   is skipped (engine.skipped_steps counts it, weights unchanged, loss scale lowered), the others train.
  sdpa_paths       our model's logits with SDPA forced to flash / memory-efficient vs the math path (bf16; flash only
                   on an unpadded batch, since it takes no mask), and vs HF BertForPreTraining in fp32.
  train_benchmark  BERT-base seq 512 bf16 (LAMB, ZeRO-0), ours vs HF BertForPreTraining under the same DeepSpeed
                   config (benchmarks/train_bench.py): samples/s, TFLOPS, MFU against the data-sheet peak; targets
                   MFU > 50% and >= 1.5x the baseline are reported, not asserted.
Without a CUDA device it prints "no CUDA device: skipped" and exits 0 (writing {"skipped": ...} when --output is given).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

SKIP_MESSAGE = "no CUDA device: skipped (benchmarks/gpu_check.py needs one NVIDIA GPU)"


def _tiny_config(vocab: int = 1024):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def _batch(config, batch: int, seq: int, device, padded: bool = True, seed: int = 0) -> dict:
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


def check_lamb(steps: int = 8) -> dict:
    from deepspeed.ops.lamb import FusedLamb

    from pretraining.optim import Lamb, param_groups

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.LayerNorm(512), torch.nn.GELU(),
                              torch.nn.Linear(512, 64)).cuda()
    twin = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    fused = FusedLamb(param_groups(ref, hp["weight_decay"]), **hp)
    groups = [{"params": [t for t, p in zip(twin, ref.parameters()) if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [t for t, p in zip(twin, ref.parameters()) if p.ndim < 2], "weight_decay": 0.0}]
    ours = Lamb(groups, **hp)
    worst = []
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        for p, t in zip(ref.parameters(), twin):  # identical gradients into both
            grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-2
            p.grad, t.grad = grad.clone(), grad.clone()
        fused.step()
        ours.step()
        worst.append(max(float((p - t).abs().max() / p.abs().max().clamp(min=1e-12))
                         for p, t in zip(ref.parameters(), twin)))
    return dict(steps=steps, max_rel_param_diff_per_step=worst, passed=max(worst) < 1e-4)


def check_fp16_loss_scaling(steps: int = 6, inject_at: int = 3) -> dict:
    import deepspeed

    from biobert import dist
    from pretraining.model import BertForPreTraining
    from pretraining.optim import build_optimizer

    dist.init()
    torch.manual_seed(0)
    config = _tiny_config()
    model = BertForPreTraining(config).cuda().train()
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 1000},
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, "adamw", 1e-3, device_type="cuda"),
                                      config=ds)
    log = []
    for step in range(steps):
        batch = _batch(config, 4, 64, "cuda", seed=step)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        scale = float(engine.optimizer.cur_scale)
        loss = engine(**batch)["loss"]
        if step == inject_at:
            loss = loss * float("inf")  # what an fp16 overflow in the forward looks like to the scaler
        engine.backward(loss)
        engine.step()
        changed = any(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))
        log.append(dict(step=step, loss=float(loss), scale_before=scale, scale_after=float(engine.optimizer.cur_scale),
                        weights_changed=changed, skipped_total=int(engine.skipped_steps)))
    inj = log[inject_at]
    passed = (engine.skipped_steps == 1 and not inj["weights_changed"] and inj["scale_after"] < inj["scale_before"]
              and all(r["weights_changed"] for i, r in enumerate(log) if i != inject_at))
    return dict(steps=log, skipped_steps=int(engine.skipped_steps), passed=bool(passed))


def _logits(model, batch: dict) -> dict:
    """MLM logits at the real (non-padding) positions and NSP logits, fp32."""
    out = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, return_logits=True)
    real = batch["attention_mask"].bool()
    return dict(mlm=out["prediction_logits"][real].float(), nsp=out["seq_relationship_logits"].float())


def _max_diff(a: dict, b: dict) -> dict:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def check_sdpa_paths() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.engine_bench import hf_twin
    from pretraining.model import BertForPreTraining

    torch.manual_seed(0)
    config = _tiny_config()
    fp32 = BertForPreTraining(config).cuda().eval()
    hf = hf_twin(fp32).cuda().eval()
    ours = BertForPreTraining(config).cuda().eval().to(torch.bfloat16)
    ours.load_state_dict(fp32.state_dict())
    out, passed = {}, True
    for padded in (False, True):
        key = "padded" if padded else "unpadded"
        batch = _batch(config, 8, 256, "cuda", padded=padded, seed=1)
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            ref = _logits(ours, batch)
        # flash takes no attention mask: our model uses it only for batches without padding
        backends = [("efficient", SDPBackend.EFFICIENT_ATTENTION)]
        if not padded:
            backends.append(("flash", SDPBackend.FLASH_ATTENTION))
        for name, backend in backends:
            try:
                with torch.no_grad(), sdpa_kernel([backend]):
                    got = _logits(ours, batch)
            except RuntimeError as e:  # the backend does not support this GPU / dtype / mask
                out[f"{key}_{name}"] = dict(available=False, error=str(e)[:300])
                continue
            diff = _max_diff(got, ref)
            ok = all(d <= 5e-2 * max(1.0, float(ref[k].abs().max())) for k, d in diff.items())  # bf16 rounding
            out[f"{key}_{name}"] = dict(available=True, max_abs_diff_vs_math=diff, passed=ok)
            passed &= ok
        with torch.no_grad():  # the fp32 model against HF on the same GPU: same numbers whatever kernel SDPA picks
            h = hf(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
            mine = _logits(fp32, batch)
        diff = _max_diff(mine, dict(mlm=h.prediction_logits[batch["attention_mask"].bool()],
                                    nsp=h.seq_relationship_logits))
        out[f"{key}_fp32_vs_hf"] = diff
        passed &= all(d < 1e-3 for d in diff.values())
    out["passed"] = bool(passed)
    return out


def check_train_benchmark(steps: int, micro_batch: int) -> dict:
    from benchmarks import train_bench as tb

    rep = tb.main(tb.TrainBenchConfig(model="base", seq_len=512, micro_batch=micro_batch, precision="bf16",
                                      optimizer="lamb", steps=steps, warmup=3, min_fill=0.25))
    ours, hf = rep["results"]["ours"], rep["results"]["hf_baseline"]
    rep["targets"] = dict(mfu_above_50pct=bool(ours["mfu"] and ours["mfu"] > 0.5),
                          speedup_at_least_1_5=bool(rep["speedup"] >= 1.5))
    rep["passed"] = True  # a speed figure, not a correctness check: targets are reported beside it
    del hf
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="gpu_check.json")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--bench-steps", type=int, default=10)
    p.add_argument("--bench-micro-batch", type=int, default=32)
    a = p.parse_args(argv)
    out = Path(a.output)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE, flush=True)
        _write(out, {"skipped": True, "reason": SKIP_MESSAGE})
        return 0
    from benchmarks.report import hardware

    results = {"skipped": False, "hardware": hardware(), "checks": {}}
    checks = [("lamb_numerics", check_lamb), ("fp16_loss_scale", check_fp16_loss_scaling),
              ("sdpa_paths", check_sdpa_paths)]
    if not a.skip_benchmark:
        checks.append(("train_benchmark", lambda: check_train_benchmark(a.bench_steps, a.bench_micro_batch)))
    for name, fn in checks:
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # record and go on: one broken path must not hide the others
            res = dict(passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        res["seconds"] = time.perf_counter() - t
        results["checks"][name] = res
        print(f"{name}: {'PASS' if res.get('passed') else 'FAIL'} ({res['seconds']:.1f} s)", flush=True)
        torch.cuda.empty_cache()
    results["passed"] = all(r.get("passed") for r in results["checks"].values())
    _write(out, results)
    print(f"wrote {out}; all passed: {results['passed']}")
    return 0 if results["passed"] else 1


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def cli(argv: list[str] | None = None) -> int:
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
