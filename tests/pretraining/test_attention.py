"""The packed layout and the attention paths on CPU: pack() bookkeeping against a loop, the flash_varlen path's glue
(with a CPU reference kernel of varlen_attn's contract) against the padded SDPA path and transformers, the fused QKV
GEMM, and torch.compile(fullgraph=True) of forward + backward (a graph break would mean a host sync)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import hf_labels, hf_twin, make_batch, tiny_config

from pretraining import attention
from pretraining.attention import pack
from pretraining.model import BertForPreTraining


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's contract, one sequence at a time: q/k/v [N, heads, head_dim], sequences at cu_q boundaries."""
    bounds = cu_q.tolist()
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) == max_q == max_k
    out = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
           for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


@torch.library.custom_op("biobert_test::varlen_ref", mutates_args=())
def varlen_ref_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    return reference_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen)


@varlen_ref_op.register_fake
def _(q, k, v, cu, max_seqlen):
    return torch.empty_like(q)


@torch.library.custom_op("biobert_test::varlen_ref_bwd", mutates_args=())
def varlen_ref_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # softmax attention's backward by hand (autograd does not record inside a custom op), one sequence at a time
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu.tolist()
    scale = q.shape[-1] ** -0.5
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs, gs = (x[a:b].transpose(0, 1) for x in (q, k, v, grad))  # [heads, L, head_dim]
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, -1)
        dv[a:b] = (probs.transpose(1, 2) @ gs).transpose(0, 1)
        dp = gs @ vs.transpose(1, 2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        dq[a:b] = (ds @ ks * scale).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1)
    return dq, dk, dv


@varlen_ref_bwd.register_fake
def _(grad, q, k, v, cu, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    return (*varlen_ref_bwd(grad, q, k, v, cu, ctx.max_seqlen), None, None)


varlen_ref_op.register_autograd(_backward, setup_context=_setup)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Route attention through the flash_varlen code path, with the opaque reference op as the kernel."""
    monkeypatch.setattr(attention, "VARLEN_KERNEL", lambda q, k, v, cq, ck, mq, mk: varlen_ref_op(q, k, v, cq, mq))
    monkeypatch.setattr(attention, "attention_path", lambda device, dtype, p: "flash_varlen" if p == 0 else "sdpa_padded")


def packed_of(batch):
    return pack(batch["attention_mask"], batch["input_ids"], batch["token_type_ids"], batch["masked_lm_positions"],
                batch["masked_lm_ids"], batch["next_sentence_labels"])


def test_pack_bookkeeping_against_a_loop():
    """Holes in the mask, an empty row, right padding: every index is what a plain loop says."""
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    ids = torch.arange(24).view(4, 6) + 100
    types = (torch.arange(24).view(4, 6) % 2)
    positions = torch.tensor([[2, 0], [3, 5], [0, 0], [1, 4]])
    lm_ids = positions * 10
    p = pack(mask, ids, types, positions, lm_ids, torch.tensor([0, 1, 1, 0]))
    real = mask.bool().clone()
    real[2, 0] = True  # an empty row keeps its first slot
    rows = [[t for t in range(6) if real[b, t]] for b in range(4)]
    flat = [b * 6 + t for b in range(4) for t in rows[b]]
    assert p.token_index.tolist() == flat and p.tokens == len(flat) == 14
    assert p.input_ids.tolist() == [int(ids.view(-1)[i]) for i in flat]
    assert p.token_type_ids.tolist() == [int(types.view(-1)[i]) for i in flat]
    assert p.position_ids.tolist() == [t for b in range(4) for t in rows[b]]  # the columns: HF's position ids
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 7, 8, 14]
    assert p.max_seqlen == 6 and isinstance(p.max_seqlen, int) and (p.batch, p.seq_len) == (4, 6)
    assert p.cls_rows.tolist() == [0, 3, 7, 8]
    assert p.pad_index.tolist() == [b * 6 + i for b in range(4) for i in range(len(rows[b]))]
    assert p.key_mask.shape == (4, 1, 1, 6)
    assert p.key_mask[:, 0, 0].sum(1).tolist() == [len(r) for r in rows]
    # masked-LM slots: position 0 = unused; row = where that (b, column) token sits in the packed order
    want = [flat.index(b * 6 + int(positions[b, j])) for b in range(4) for j in range(2) if positions[b, j]]
    assert p.mlm_rows.tolist() == want and p.masked == 5
    assert p.mlm_labels.tolist() == [int(x) for x in lm_ids[positions != 0]]
    moved = p.to("cpu", non_blocking=True)
    assert moved.max_seqlen == 6 and torch.equal(moved.cu_seqlens, p.cu_seqlens)


def test_packed_input_equals_padded_input():
    """The loader's path (model(packed=...)) is the HF-style path (model(mask, ...)), which equals transformers."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch()
    a = model(**batch)
    b = model(packed=packed_of(batch))
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_correct"):
        assert torch.equal(a[key], b[key]), key
    assert a["mlm_count"] == b["mlm_count"] == int((batch["masked_lm_positions"] != 0).sum())


def test_fused_qkv_is_one_gemm_over_the_hf_parameters():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    keys = set(model.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys and not any("qkv" in k for k in keys)
    attn = model.bert.encoder.layer[0].attention.self
    x = torch.randn(7, 32)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        p = pack(None, torch.zeros(1, 7, dtype=torch.long))
        fused = attn(x, p)
    finally:
        handle.remove()
    assert "Linear" not in calls  # no per-projection Linear call: one F.linear over the concatenated weights
    # the ZeRO-3 fallback (each Linear gathers its own weights) computes the same
    attn.query.weight.ds_status = "available"
    try:
        three = attn(x, p)
    finally:
        del attn.query.weight.ds_status
    torch.testing.assert_close(fused, three, atol=1e-6, rtol=1e-6)


def test_varlen_path_equals_padded_path_and_transformers(varlen_on_cpu):
    """The flash_varlen glue (views into [N, 3, heads, head_dim], cu_seqlens, max_seqlen) with a correct kernel gives
    transformers' logits, loss and gradients, as the padded SDPA path does."""
    torch.manual_seed(0)
    ours = BertForPreTraining(tiny_config()).eval()
    hf = hf_twin(ours)
    batch = make_batch()
    assert ours.bert.attention_path(torch.device("cpu"), torch.float32) == "flash_varlen"
    out = ours(**batch, return_logits=True)
    ref = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
             attention_mask=batch["attention_mask"], labels=hf_labels(batch),
             next_sentence_label=batch["next_sentence_labels"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out["prediction_logits"][real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], ref.loss, atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    ref.loss.backward()
    for name in ("query", "key", "value"):
        ours_w = getattr(ours.bert.encoder.layer[0].attention.self, name).weight.grad
        hf_w = getattr(hf.bert.encoder.layer[0].attention.self, name).weight.grad
        torch.testing.assert_close(ours_w, hf_w, atol=1e-5, rtol=1e-4)


def _count_graphs():
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("path", ["sdpa_padded", "flash_varlen"])
def test_forward_backward_compiles_fullgraph_without_recompiling(path, request):
    """fullgraph=True: any host sync (.item(), nonzero, bool(tensor), data-dependent shapes) would be a graph break
    and fail here. Two batches with other N, max_seqlen and masked counts reuse the graph (dynamic shapes)."""
    if path == "flash_varlen":
        request.getfixturevalue("varlen_on_cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).train()
    counter = _count_graphs()
    step = torch.compile(lambda packed: model(packed=packed)["loss"], fullgraph=True, dynamic=True, backend=counter)
    eager, frames = {}, []
    for seed, T in ((0, 16), (1, 12)):
        packed = packed_of(make_batch(T=T, seed=seed))
        loss = step(packed)
        frames.append(counter.frame_count)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        eager_loss = model(packed=packed)["loss"]
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
        model.zero_grad()
        eager[T] = packed.max_seqlen
    assert eager[16] != eager[12]
    assert frames[0] >= 1 and frames[1] == frames[0]  # the second batch reused the first one's graph
    torch._dynamo.reset()


@pytest.mark.slow
def test_model_compile_layers_equals_eager():
    """model.compile: true -- the inductor-compiled encoder layers against eager, loss and gradients, two batches."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = BertForPreTraining(tiny_config()).train()
    compiled = BertForPreTraining(tiny_config()).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.bert.compile_layers()
    for seed, T in ((0, 16), (1, 12)):
        packed = packed_of(make_batch(T=T, seed=seed))
        a, b = eager(packed=packed)["loss"], compiled(packed=packed)["loss"]
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
        eager.zero_grad()
        compiled.zero_grad()
    torch._dynamo.reset()


def test_dropout_flash_path_glue_traces_with_fake_tensors(monkeypatch):
    """The CUDA-only flash_varlen_dropout path (custom ops over aten._flash_attention_forward/_backward) run on fake
    tensors: shapes, the autograd wiring (rng state saved for the backward) and the views into [N, 3, heads, hd]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(attention, "attention_path", lambda device, dtype, p: "flash_varlen_dropout")
    batch = make_batch()
    packed = packed_of(batch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        qkv = torch.randn(packed.tokens, 3 * 32, dtype=torch.bfloat16, requires_grad=True)
        out = attention.attend(qkv, packed, heads=4, dropout_p=0.1)
        assert out.shape == (packed.tokens, 32) and out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert qkv.grad.shape == qkv.shape


def test_a_flash_kernel_that_fails_falls_back_with_a_warning(monkeypatch, caplog):
    """The first eager call runs the kernel once; a failure is remembered, warned about, and leaves the RNG alone."""
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "_WORKS", {})
    monkeypatch.setattr(attention, "VARLEN_KERNEL", lambda q, k, v, cq, ck, mq, mk: reference_varlen(q, k, v, cq, ck,
                                                                                                     mq, mk))
    state = torch.get_rng_state()
    assert attention._flash_works(torch.device("cpu"), dropout=False) is True
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(attention, "_WORKS", {})
    monkeypatch.setattr(attention, "VARLEN_KERNEL", broken)
    with caplog.at_level("WARNING"):
        assert attention._flash_works(torch.device("cpu"), dropout=False) is False
    assert "using the padded SDPA path" in caplog.text and "no kernel image" in caplog.text
    assert attention._WORKS == {(None, False): False}
