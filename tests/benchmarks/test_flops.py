"""FLOPs and MFU arithmetic against numbers worked out by hand (docs/benchmarks.md, "FLOPs accounting")."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig

from benchmarks.train_bench import figures
from pretraining.metrics import batch_flops, peak_tflops
from pretraining.model import training_flops_per_sequence

# H=4, FF=8, L=2, V=10: small enough to expand every term on paper.
CFG = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)


def test_flops_per_sequence_by_hand():
    # per layer: QKVO 4*(16+4)=80, FFN 2*4*8 + 8 + 4 = 76, two LayerNorms 4*4 = 16 -> 172 parameters
    # encoder 6*172*2*T, attention 12*L*H*T^2, MLM head 6*M*(H^2+3H+H*V+V) = 6*M*(16+12+40+10), NSP 6*(16+12+2)
    T, M = 5, 2
    expected = 6 * 172 * 2 * T + 12 * 2 * 4 * T * T + 6 * M * 78 + 6 * 30
    assert training_flops_per_sequence(CFG, T, M) == expected == 10320 + 2400 + 936 + 180
    # default M = round(0.15 * T)
    assert training_flops_per_sequence(CFG, 20) == training_flops_per_sequence(CFG, 20, 3)


def test_bert_base_close_to_six_params_tokens():
    """Sanity: BERT-base at seq 128 is ~6 x 85M encoder params per token plus a few % attention."""
    base = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)
    per_token = training_flops_per_sequence(base, 128, 0) / 128
    assert 6 * 85e6 * 1.0 < per_token < 6 * 85e6 * 1.1


def test_padding_gets_no_credit():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[1, 0], [2, 4]])  # position 0 = unused slot
    expected = training_flops_per_sequence(CFG, 3, 1) + training_flops_per_sequence(CFG, 6, 2)
    assert batch_flops(CFG, mask, positions) == expected
    assert batch_flops(CFG, mask, positions) < 2 * training_flops_per_sequence(CFG, 6, 2)


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "fp16", 756.0), ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-40GB", "fp32", 156.0),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0), ("Tesla V100-SXM2-32GB", "fp32", 15.7)])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision)[0] == peak
    assert peak_tflops(name, precision, override=7.0)[0] == 7.0


def test_cpu_peak_is_probed_in_the_run_precision():
    from pretraining.metrics import _matmul_probe

    fp32, source = peak_tflops("cpu", "fp32")
    bf16, bf16_source = peak_tflops("cpu", "bf16")
    assert source == "cpu fp32 matmul probe" and bf16_source == "cpu bf16 matmul probe"
    assert fp32 > 0 and bf16 > 0
    # one probe per (precision, thread count): a second ask is the cached figure, not a new measurement
    hits = _matmul_probe.cache_info().hits
    assert peak_tflops("cpu", "bf16")[0] == bf16 and _matmul_probe.cache_info().hits == hits + 1


def test_mfu_from_totals():
    # 2 ranks, 4.0e12 useful FLOPs in 2 s -> 2 TFLOPS; per-device peak 0.5 -> MFU 2 / (0.5 * 2) = 2.0
    tot = dict(samples=64, tokens=6400, flops=4.0e12, seconds=2.0, data_wait=0.5, peak_memory_bytes=3 * 2**20)
    f = figures(tot, 0.5, world_size=2)
    assert f["samples_per_s"] == 32 and f["tokens_per_s"] == 3200 and f["tflops"] == 2.0
    assert f["mfu"] == 2.0 and f["data_wait_fraction"] == 0.25 and f["peak_memory_mb"] == 3.0
    assert figures(tot, float("nan"), 1)["mfu"] is None
    assert math.isclose(figures(tot, 989.0, 8)["mfu"], 2.0 / (989.0 * 8))
