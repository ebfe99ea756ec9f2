"""Sirocco's C kernels (`csrc/*.c`): built at run time, called through ctypes.

The sources are compiled together on first use with the system's C compiler (about two
seconds) into one shared library, cached under a key of the sources, the flags and the CPU,
and called through ctypes, which releases the GIL: a kernel's work can be split between
threads of a pool. They are plain C (no PyTorch headers), built with no -ffast-math (the
compiler may not reassociate sums) and -ffp-contract=off (it may not fuse a multiply and
an add in some loops and not in others), so their arithmetic is one fixed order.

Where no compiler is found, `library()` is None and the model keeps PyTorch's operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off",
         "-fopenmp-simd", "-std=c11"]

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# Every exported function: (argument types, return type).
SIGNATURES: dict[str, tuple[list, type | None]] = {
    "sirocco_paged_attention": ([_P] * 8 + [_I64] * 3 + [_I] * 6 + [_F], _I),
    "sirocco_rms_norm": ([_P] * 4 + [_I] * 2 + [_I64] * 3 + [_F], None),
    "sirocco_silu_mul": ([_P] * 2 + [_I] * 2 + [_I64] * 3, None),
    "sirocco_rope_store": ([_P] * 7 + [_I] + [_I64] * 2 + [_I] * 3, None),
}


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
def library() -> ctypes.CDLL | None:
    """The kernels, compiled on first use; None (logged) where no C compiler builds them."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the model runs PyTorch's operators, and attention "
                    "depends on the batch (see the README's Exactness section)")
        return None
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES)
                         + " ".join(FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"sirocco-kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built),
                                     "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("could not compile Sirocco's kernels (%s): the model runs "
                            "PyTorch's operators\n%s", compiler, result.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent starts never load half a file
    lib = ctypes.CDLL(str(target))
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="sirocco-kernel")


def threads_for(work: float, items: int, per_thread: float) -> int:
    """How many threads share `items` work items costing `work` in all: one where the
    work is under `per_thread` (handing it to a pool would cost more than it saves), at
    most `torch.get_num_threads()` and `items`."""
    if work < per_thread:
        return 1
    return max(1, min(torch.get_num_threads(), items, int(work // per_thread)))


def run_split(fn: Callable[..., object], before: Sequence[object], items: int,
              after: Sequence[object], threads: int) -> list[object]:
    """fn(*before, first, last, *after) over items [0, items) in `threads` ranges, in
    parallel; the results of each range."""
    if threads <= 1 or items <= 1:
        return [fn(*before, 0, items, *after)]
    bounds = [items * i // threads for i in range(threads + 1)]
    futures = [_pool(threads).submit(fn, *before, lo, hi, *after)
               for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
    return [f.result() for f in futures]
