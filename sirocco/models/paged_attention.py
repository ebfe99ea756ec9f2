"""Batch-invariant attention over the paged KV cache on a CPU (float32).

`csrc/paged_attention.c` computes every query row on its own, from its position and its
sequence's block table, in one fixed order of arithmetic: a token's attention output, and so
its logits, are bitwise the same whatever else shares the batch, however the prompt was
chunked, and whether its prefix came from the prefix cache. It also reads keys and values
where they lie in the cache, without gathering each sequence's blocks into a padded copy.

The C file is compiled on first use with the system's C compiler (about a second) into
a cache keyed by the source, the flags and the CPU, and called through ctypes, which
releases the GIL; the work items (a chunk of one sequence's queries, one KV head) are split
between `torch.get_num_threads()` threads. Where no compiler is found, `available()` is False
and the model keeps PyTorch's attention.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
CHUNK = 32  # queries of one sequence per work item (they share one transposed copy of keys)
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off",
         "-fopenmp-simd", "-std=c11"]


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
        return cls(*(torch.tensor(v, dtype=torch.int32) for v in (tables, seq_of, pos_of, bounds)))


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return os.uname().machine + flags


def _cache_dir() -> Path:
    root = os.environ.get("SIROCCO_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sirocco", "kernels")
    return Path(root)


@cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: attention runs PyTorch's kernel, whose results "
                    "depend on the batch (see the README's Exactness section)")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"paged_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("could not compile the paged attention kernel (%s): attention "
                            "runs PyTorch's kernel\n%s", compiler, result.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent starts never load half a file
    library = ctypes.CDLL(str(target))
    fn = library.sirocco_paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 6 + [
        ctypes.c_float]
    return library


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the invariant kernel serves this dtype and device (CPU, float32)."""
    return device.type == "cpu" and dtype == torch.float32 and _library() is not None


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="sirocco-attention")


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, layout: PagedLayout,
                    sliding_window: int | None) -> Tensor:
    """Attention of packed queries q [T, heads, head_dim] over the cache blocks
    [num_blocks, block_size, kv_heads, head_dim] of their sequences; [T, heads, head_dim]."""
    library = _library()
    assert library is not None and q.dtype == torch.float32
    q = q.contiguous()
    t, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    num_chunks = layout.chunks.shape[0] - 1
    items = num_chunks * kv_heads
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), layout.tables.data_ptr(),
            layout.seq_of.data_ptr(), layout.pos_of.data_ptr(), layout.chunks.data_ptr(),
            out.data_ptr(), num_chunks)
    shape = (heads, kv_heads, head_dim, block_size, layout.tables.shape[1],
             sliding_window or 0, head_dim ** -0.5)
    fn = library.sirocco_paged_attention
    threads = min(int(os.environ.get("SIROCCO_ATTN_THREADS", torch.get_num_threads())), items)
    if threads <= 1:
        status = fn(*args, 0, items, *shape)
    else:
        bounds = [items * i // threads for i in range(threads + 1)]
        futures = [_pool(threads).submit(fn, *args, lo, hi, *shape)
                   for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
        status = min(f.result() for f in futures)
    if status != 0:
        raise MemoryError("the paged attention kernel could not allocate its scores")
    return out
