"""Packed (unpadded) batches and the attention core that runs on them.

A [B, T] batch with padding becomes N real tokens, sequence after sequence. Everything but attention (embeddings,
projections, FFN, LayerNorm, the MLM head) then runs on [N, H]. `Packed` holds the bookkeeping: built by `pack()` from
the attention mask, on CPU by the loader thread (so no index is computed on the GPU and no value is read back: the
GPU step has no host sync), or by the model itself for HF-style callers that pass an attention mask.

Attention over packed [N, heads, head_dim] tensors, one function, chosen per call from static facts only (device, dtype,
dropout, torch version) so a compiled graph has no branch on data:
  flash_varlen          torch.nn.attention.varlen.varlen_attn (FlashAttention-2 over cu_seqlens; torch >= 2.10, CUDA,
                        fp16/bf16, sm80+) when attention dropout is off (eval, or attention_probs_dropout_prob=0).
  flash_varlen_dropout  the same flash kernel through aten._flash_attention_forward/_backward, which take a dropout
                        probability (varlen_attn hard-codes 0): BERT's attention dropout 0.1 kept, at flash speed.
  sdpa_padded           the fallback everywhere else (CPU, fp32, older torch/GPUs): scatter to [B, max_seqlen] with
                        one index_copy, SDPA with a key mask, gather back. Same packed inputs and outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # older torch: the SDPA fallback
    _torch_varlen_attn = None

# The varlen kernel behind the flash_varlen path. Tests substitute a CPU reference with the same contract to check the
# packed bookkeeping without a GPU; production code never changes it.
VARLEN_KERNEL = _torch_varlen_attn
PATHS = ("flash_varlen", "flash_varlen_dropout", "sdpa_padded")


@dataclass
class Packed:
    """Where the real tokens of a [B, T] batch live once padding is dropped (see `pack`). Tensors are [N] unless noted.

    Rows are sequence-major: sequence b's tokens are rows cu_seqlens[b] .. cu_seqlens[b+1]-1, in column order.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor  # the token's column in the [B, T] batch (HF's position ids)
    token_index: torch.Tensor  # flat position b*T + t in the [B, T] batch: scatters outputs back to [B, T, ...]
    pad_index: torch.Tensor  # flat position b*max_seqlen + i in the left-aligned [B, max_seqlen] layout (SDPA)
    key_mask: torch.Tensor  # [B, 1, 1, max_seqlen] bool, True = a real key (SDPA)
    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative lengths
    cls_rows: torch.Tensor  # [B] row of each sequence's first real token ([CLS])
    mlm_rows: torch.Tensor | None  # [M] rows of the used masked-LM slots
    mlm_labels: torch.Tensor | None  # [M]
    nsp_labels: torch.Tensor | None  # [B]
    batch: int
    seq_len: int  # T of the padded batch
    max_seqlen: int  # longest real sequence (a Python int: the kernels need it on the host)
    tokens: int  # N
    masked: int  # M (0 without MLM labels)

    def to(self, device, non_blocking: bool = False) -> Packed:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Packed:
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> Packed:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Packed(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def pack(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
         masked_lm_positions: torch.Tensor | None = None, masked_lm_ids: torch.Tensor | None = None,
         next_sentence_labels: torch.Tensor | None = None) -> Packed:
    """Build the packed layout. Reads sizes back (nonzero, max), so call it on CPU tensors where speed matters.

    Any mask works, not only right-padding (position ids stay the columns). A sequence with no real token gets its
    first slot as one (an all-masked softmax row would be NaN). Masked-LM slot j of sequence b is used iff its
    position != 0 ([CLS] is never masked), as in NVIDIA's shards.
    """
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.to(torch.bool, copy=True)
        mask[:, 0] |= ~mask.any(1)
    lengths = mask.sum(1)
    token_index = mask.flatten().nonzero().squeeze(1)
    N = token_index.numel()
    max_seqlen = int(lengths.max()) if B else 0
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = lengths.cumsum(0)
    starts = cu_seqlens[:-1].long()
    row = torch.div(token_index, T, rounding_mode="floor")
    within = torch.arange(N, device=device) - starts[row]
    positions = torch.arange(max_seqlen, device=device)
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    mlm_rows = mlm_labels = None
    masked = 0
    if masked_lm_positions is not None and masked_lm_ids is not None:
        used = masked_lm_positions != 0
        lookup = torch.zeros(B * T, dtype=torch.long, device=device)
        lookup[token_index] = torch.arange(N, device=device)
        flat = masked_lm_positions + torch.arange(B, device=device)[:, None] * T
        mlm_rows, mlm_labels = lookup[flat[used]], masked_lm_ids[used]
        masked = mlm_rows.numel()
    return Packed(
        input_ids=input_ids.flatten()[token_index], token_type_ids=token_type_ids.flatten()[token_index],
        position_ids=token_index - row * T, token_index=token_index, pad_index=row * max_seqlen + within,
        key_mask=(positions[None, :] < lengths[:, None])[:, None, None, :], cu_seqlens=cu_seqlens, cls_rows=starts,
        mlm_rows=mlm_rows, mlm_labels=mlm_labels,
        nsp_labels=None if next_sentence_labels is None else next_sentence_labels.view(-1),
        batch=B, seq_len=T, max_seqlen=max_seqlen, tokens=N, masked=masked)


# ---------------------------------------------------------------------------------------------------------- the paths


def _flash_capable(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 0)


_CAPABILITY: dict[int, tuple[int, int]] = {}
_WORKS: dict[tuple[int, bool], bool] = {}  # (device index, dropout) -> the flash op ran forward and backward


def _capability(index: int) -> tuple[int, int]:
    if index not in _CAPABILITY:  # plain dicts, not lru_cache: torch.compile traces through them without a break
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def _flash_works(device: torch.device, dropout: bool) -> bool:
    """Run the flash op once, forward and backward, on a tiny input (at the first eager call; the trainer asks before
    its first step). A failure falls back to the SDPA path with a warning instead of stopping the run."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (index, dropout)
    if key not in _WORKS:
        if torch.compiler.is_compiling():  # never probe while tracing: the eager call before compilation did
            return True
        try:
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # the probe leaves the run's random streams as they were
                q, k, v = (torch.randn(16, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
                out = flash_varlen_dropout(q, k, v, cu, 9, 0.1) if dropout else VARLEN_KERNEL(q, k, v, cu, cu, 9, 9)
                out.float().sum().backward()
                if cuda:
                    torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces here, not mid-training
            _WORKS[key] = True
        except Exception as e:  # noqa: BLE001 - any kernel/launch error: the fallback computes the same thing
            log.warning("flash varlen attention%s failed on %s (%s: %s); using the padded SDPA path",
                        " with dropout" if dropout else "", device, type(e).__name__, e)
            _WORKS[key] = False
    return _WORKS[key]


def attention_path(device: torch.device, dtype: torch.dtype, dropout_p: float) -> str:
    """Which implementation runs for these static facts (see the module docstring)."""
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and VARLEN_KERNEL is not None
            and _flash_capable(device) and _flash_works(device, dropout_p > 0)):
        return "flash_varlen" if dropout_p == 0 else "flash_varlen_dropout"
    return "sdpa_padded"


def attend(qkv: torch.Tensor, packed: Packed, heads: int, dropout_p: float) -> torch.Tensor:
    """qkv [N, 3H] (query | key | value) -> attention output [N, H]. dropout_p: 0 in eval."""
    N, H = qkv.shape[0], qkv.shape[1] // 3
    path = attention_path(qkv.device, qkv.dtype, dropout_p)
    if path == "sdpa_padded":
        return _sdpa_padded(qkv, packed, heads, dropout_p)
    q, k, v = qkv.view(N, 3, heads, H // heads).unbind(1)
    if path == "flash_varlen":
        out = VARLEN_KERNEL(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen)
    else:
        out = flash_varlen_dropout(q, k, v, packed.cu_seqlens, packed.max_seqlen, dropout_p)
    return out.reshape(N, H)


def _sdpa_padded(qkv: torch.Tensor, packed: Packed, heads: int, dropout_p: float) -> torch.Tensor:
    B, Tm, H = packed.batch, packed.max_seqlen, qkv.shape[1] // 3
    x = qkv.new_zeros(B * Tm, 3 * H).index_copy(0, packed.pad_index, qkv)
    q, k, v = x.view(B, Tm, 3, heads, H // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, Tm, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.key_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(B * Tm, H).index_select(0, packed.pad_index)


# ----------------------------------------------------------------- flash varlen with dropout (aten ops, CUDA only)
# varlen_attn passes dropout_p=0 to the flash kernel; the kernel itself takes a probability and returns the Philox
# state it drew, which its backward replays. Two custom ops (opaque to torch.compile, as torch's own varlen op is).


@torch.library.custom_op("biobert::flash_varlen_dropout_fwd", mutates_args=())
def _dropout_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> (out, logsumexp, rng_state, unused): the last two go to the backward as they came (older torch named them
    # philox_seed / philox_offset), so the backward replays exactly the forward's dropout mask.
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False)
    return out, lse, rng_state, unused


@_dropout_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p):  # as torch's meta kernel of _flash_attention_forward
    return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64))


@torch.library.custom_op("biobert::flash_varlen_dropout_bwd", mutates_args=())
def _dropout_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float,
                 rng_state: torch.Tensor, unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False,
        rng_state, unused)
    return dq, dk, dv


@_dropout_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, rng_state, unused):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _dropout_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, dropout_p = inputs
    out, lse, rng_state, unused = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
    ctx.max_seqlen, ctx.dropout_p = max_seqlen, dropout_p


def _dropout_backward(ctx, grad_out, grad_lse, grad_rng, grad_unused):
    q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
    dq, dk, dv = _dropout_bwd(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.dropout_p, rng_state,
                              unused)
    return dq, dk, dv, None, None, None


_dropout_fwd.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def flash_varlen_dropout(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float) -> torch.Tensor:
    """Packed attention with dropout on the attention probabilities, q/k/v [N, heads, head_dim] (CUDA, fp16/bf16)."""
    return _dropout_fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p)[0]
