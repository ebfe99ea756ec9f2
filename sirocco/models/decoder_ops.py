"""The decoder layer's element-wise work as fused CPU kernels (`csrc/decoder_ops.c`).

A decode step of a small model is bound by dispatch, not arithmetic: SmolLM2 at one stream
ran ~60 PyTorch operators a layer (a norm alone is seven), for ~12 ms of its ~25 ms step.
These calls do the same work in four a layer, row by row in one fixed order (so batch-
invariant, like the attention kernel): the norm with the residual add before it, RoPE
with the KV-cache writes, SiLU times the up projection. The model takes this path where
the paged attention kernel serves (`AttentionBatch.paged`: a CPU, float32).

Activations come and go in the dtype the next matrix kernel takes (`mistral.input_dtype`):
float32 for the packed float32 layers and Sirocco's int4/int8 kernel, bfloat16 for a layer on
PyTorch's int4 kernel; the residual stream stays float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sirocco.models.kernels import kernel, threads_for

# Elements a thread takes at least: below, a call runs on one thread.
PER_THREAD = 1 << 15


def _flag(t: Tensor) -> int:
    if t.dtype == torch.bfloat16:
        return 1
    if t.dtype == torch.float32:
        return 0
    raise TypeError(f"decoder kernels take float32 or bfloat16, not {t.dtype}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype,
             delta: Tensor | None = None) -> Tensor:
    """RMSNorm of the float32 residual stream x [T, dim], in `out_dtype`; first adds
    `delta` [T, dim] to x in place where given (the residual connection)."""
    assert x.dtype == torch.float32 and x.is_contiguous() and weight.dtype == torch.float32
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=out_dtype)
    if delta is not None:
        delta = delta.contiguous()
    work = rows * dim
    kernel("sirocco_rms_norm", work)(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
        out.data_ptr(), 0 if delta is None else _flag(delta), _flag(out), dim, rows, eps,
        threads_for(work, PER_THREAD))
    return out


def silu_mul(gate_up: Tensor, out_dtype: torch.dtype) -> Tensor:
    """silu(gate) * up of gate_up [T, 2 * inter] (gate first), [T, inter] in `out_dtype`."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=out_dtype)
    work = rows * width * 4
    kernel("sirocco_silu_mul", work)(gate_up.data_ptr(), out.data_ptr(), _flag(gate_up),
                                     _flag(out), width // 2, rows, threads_for(work, PER_THREAD))
    return out


def rope_store(qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, k_cache: Tensor,
               v_cache: Tensor, heads: int) -> Tensor:
    """RoPE on the q and k heads of qkv [T, (heads + 2 kv_heads) * head_dim]; writes k and
    v into the caches (float32 or bfloat16) at `slots` (int64 [T]): k_cache [num_blocks,
    kv_heads, head_dim, block_size] (transposed), v_cache [num_blocks, block_size, kv_heads,
    head_dim]. Returns q [T, heads, head_dim] (float32)."""
    qkv = qkv.contiguous()
    rows = qkv.shape[0]
    _, kv_heads, head_dim, block_size = k_cache.shape
    assert k_cache.dtype == v_cache.dtype and slots.dtype == torch.int64
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty(rows, heads, head_dim)
    work = rows * qkv.shape[1] * 2
    kernel("sirocco_rope_store", work)(
        qkv.data_ptr(), cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
        slots.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _flag(qkv),
        _flag(k_cache), rows, heads, kv_heads, head_dim, block_size,
        threads_for(work, PER_THREAD))
    return q
