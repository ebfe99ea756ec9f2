"""Batch-invariant attention over the paged KV cache on a CPU (float32 or bfloat16).

`csrc/paged_attention.c` computes every query row on its own, from its position and its
sequence's block table, in one fixed order of arithmetic: a token's attention output, and so
its logits, are bitwise the same whatever else shares the batch, however the prompt was
chunked, and whether its prefix came from the prefix cache. It also reads keys and values
where they lie in the cache, without gathering each sequence's blocks into a padded copy.

The C file is built with the other kernels (`kernels.py`); the work items (a chunk of one
sequence's queries, one KV head) are split between PyTorch's threads when there is enough
work to share. Where no compiler is found, `available()` is False and the
model keeps PyTorch's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sirocco.models.kernels import kernel, library, threads_for

CHUNK = 32  # queries of one sequence per work item (they share one transposed copy of keys)


@dataclass
class PagedLayout:
    """Where each packed token's keys live: its sequence's row of `tables` and its position.

    tables: int32 [num_seqs, max_blocks] block tables (padded with 0, never read: a query
        reads blocks up to its own position only); seq_of, pos_of: int32 [T];
    chunks: int32 [num_chunks + 1] token boundaries, each chunk of one sequence's tokens
        (the kernel's unit of work: its queries share one copy of their keys).
    """

    tables: Tensor
    seq_of: Tensor
    pos_of: Tensor
    chunks: Tensor
    key_reads: int = 0  # keys the queries read, summed (the work's size)

    @classmethod
    def build(cls, block_tables: list[list[int]], starts: list[int], counts: list[int],
              chunk: int = CHUNK) -> PagedLayout:
        """The layout of `counts[i]` new tokens of sequence i from position `starts[i]`."""
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        seq_of: list[int] = []
        pos_of: list[int] = []
        bounds = [0]
        for i, (start, n) in enumerate(zip(starts, counts, strict=True)):
            offset = len(seq_of)
            seq_of += [i] * n
            pos_of += range(start, start + n)
            bounds += [*range(offset + chunk, offset + n, chunk), offset + n]
        reads = sum(n * start + n * (n + 1) // 2 for start, n in zip(starts, counts, strict=True))
        return cls(*(torch.tensor(v, dtype=torch.int32) for v in (tables, seq_of, pos_of, bounds)),
                   key_reads=reads)


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the invariant kernel serves a model of this dtype on this device: a CPU,
    float32 or bfloat16 (the cache's dtype; the arithmetic is float32 either way)."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and library() is not None)


# Multiply-adds a thread takes at least (a decode of one stream at a few hundred positions
# is ~0.2 M: it runs on one thread).
PER_THREAD = 1 << 18


def transposed_keys(k_cache: Tensor) -> Tensor:
    """Keys [num_blocks, block_size, kv_heads, head_dim] in the kernel's layout
    [num_blocks, kv_heads, head_dim, block_size] (a copy)."""
    return k_cache.permute(0, 2, 3, 1).contiguous()


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, layout: PagedLayout,
                    sliding_window: int | None) -> Tensor:
    """Attention of packed queries q [T, heads, head_dim] over the cache blocks of their
    sequences: k_cache [num_blocks, kv_heads, head_dim, block_size] (each block's keys
    transposed: `transposed_keys`), v_cache [num_blocks, block_size, kv_heads, head_dim],
    both float32 or both bfloat16. Returns [T, heads, head_dim] (float32)."""
    assert q.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (torch.float32, torch.bfloat16)
    q = q.contiguous()
    t, heads, head_dim = q.shape
    _, kv_heads, _, block_size = k_cache.shape
    out = torch.empty_like(q)
    num_chunks = layout.chunks.shape[0] - 1
    work = layout.key_reads * heads * head_dim * 2
    status = kernel("sirocco_paged_attention", work)(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), layout.tables.data_ptr(),
        layout.seq_of.data_ptr(), layout.pos_of.data_ptr(), layout.chunks.data_ptr(),
        out.data_ptr(), num_chunks, heads, kv_heads, head_dim, block_size,
        layout.tables.shape[1], sliding_window or 0, head_dim ** -0.5,
        int(k_cache.dtype == torch.bfloat16), threads_for(work, PER_THREAD))
    if status != 0:
        raise MemoryError("the paged attention kernel could not allocate its scores")
    return out
