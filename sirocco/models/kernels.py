"""Sirocco's C kernels (`csrc/*.c`): built at run time, called through ctypes.

The sources are compiled together on first use with the system's C compiler (a few
seconds) into one shared library, cached under a key of the sources, the flags and the CPU,
and called through ctypes. They are plain C (no PyTorch headers), built with no -ffast-math
(the compiler may not reassociate sums) and -ffp-contract=off (it may not fuse a multiply
and an add in some loops and not in others), so their arithmetic is one fixed order.

A kernel splits its work between threads with OpenMP. The library links `libgomp.so.1`,
which the dynamic loader resolves to the copy PyTorch has already loaded: the kernels run
in PyTorch's own thread pool, whose threads are awake right after a matrix multiplication
(a pool of our own competed with them for the cores, and attention ran slower on two
threads than on one). Where the compiler has no OpenMP, or that library does not load, the
kernels are built without it and run on one thread.

Each call either keeps the GIL or releases it, by its size (`kernel`): a short call keeps it,
since handing the GIL to the server's event loop and taking it back cost more than the call
(releasing it in every one of a decode step's ~250 calls made SmolLM2 decode over HTTP at
half the engine's own speed); a long one releases it, so that the event loop runs meanwhile.

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # included by the sources
# SIROCCO_KERNEL_MARCH names another target than this CPU (e.g. x86-64-v3 for a fleet's
# oldest machine; x86-64, no vectors beyond SSE2, is how the tests check that every build
# computes the same bits).
FLAGS = ["-O3", f"-march={os.environ.get('SIROCCO_KERNEL_MARCH') or 'native'}", "-fPIC",
         "-shared", "-fno-fast-math", "-ffp-contract=off", "-std=c11"]
THREADED, SERIAL = ["-fopenmp"], ["-fopenmp-simd"]

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# Every exported function: (argument types, return type); each takes its thread count last
# (but for the `_available` probes).
SIGNATURES: dict[str, tuple[list, type | None]] = {
    "sirocco_paged_attention": ([_P] * 8 + [_I64] + [_I] * 6 + [_F, _I, _I], _I),
    "sirocco_rms_norm": ([_P] * 4 + [_I] * 2 + [_I64] * 2 + [_F, _I], None),
    "sirocco_silu_mul": ([_P] * 2 + [_I] * 2 + [_I64] * 2 + [_I], None),
    "sirocco_rope_store": ([_P] * 7 + [_I, _I, _I64] + [_I] * 5, None),
    "sirocco_qmatmul": ([_P] * 5 + [_I64] * 3 + [_I] * 2, _I),
    "sirocco_bf16_matmul": ([_P] * 3 + [_I64] * 3 + [_I], _I),
    "sirocco_q4_bf16_matmul": ([_P] * 5 + [_I64] * 3 + [_I], _I),
    "sirocco_bf16_matmul_available": ([], _I),
    "sirocco_decoder_stack": ([_P, _I, _P] + [_I64] * 3 + [_P] * 5 + [_I64, _I] + [_P] * 4
                              + [_I64] * 2 + [_I] * 6 + [_F, _F] + [_I64] * 3 + [_I], _I),
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


def _build(compiler: str, flags: list[str]) -> tuple[Path | None, str]:
    """The library built with `flags` (cached), or None and the compiler's complaint."""
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS)
                         + " ".join(flags).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"sirocco-kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target, ""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return None, result.stderr[-2000:]
        os.replace(built, target)  # atomic: concurrent starts never load half a file
    return target, ""


# Work (multiply-adds or elements) from which a call releases the GIL: ~0.2 ms and more.
RELEASE_GIL_AT = 1 << 21


@dataclass(frozen=True)
class Kernels:
    """The library loaded twice: calls through `holding` keep the GIL, through `releasing`
    they release it."""

    holding: ctypes.CDLL
    releasing: ctypes.CDLL


def _load(path: Path) -> Kernels:
    handles = []
    for kind in (ctypes.PyDLL, ctypes.CDLL):
        lib = kind(str(path))
        for name, (argtypes, restype) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        handles.append(lib)
    return Kernels(*handles)


def kernel(name: str, work: float) -> Callable[..., object]:
    """The kernel `name` for a call of `work` multiply-adds (or elements): one that keeps
    the GIL below `RELEASE_GIL_AT`, else one that releases it."""
    lib = library()
    assert lib is not None, "no kernels: check library() first"
    return getattr(lib.holding if work < RELEASE_GIL_AT else lib.releasing, name)


@cache
def library() -> Kernels | None:
    """The kernels, compiled on first use; None (logged) where no C compiler builds them."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the model runs PyTorch's operators, and attention "
                    "depends on the batch (see the README's Exactness section)")
        return None
    path, error = _build(compiler, FLAGS + THREADED)
    if path is not None:
        try:
            return _load(path)
        except OSError as exc:  # e.g. a libgomp older than the compiler's
            error = str(exc)
    log.warning("Sirocco's kernels run on one thread: no OpenMP build (%s)", error.strip()[-500:])
    path, error = _build(compiler, FLAGS + SERIAL)
    if path is None:
        log.warning("could not compile Sirocco's kernels (%s): the model runs PyTorch's "
                    "operators\n%s", compiler, error)
        return None
    return _load(path)


@cache
def bf16_dot_products() -> bool:
    """Whether the bfloat16 kernels (`csrc/bf16_matmul.c`) run here: built, on a CPU with
    AVX512-BF16."""
    lib = library()
    return lib is not None and bool(lib.holding.sirocco_bf16_matmul_available())


# The matmul kernels' layouts hold outputs in tiles of LANES (csrc/lanes.h); a thread takes
# at least MATMUL_PER_THREAD multiply-adds.
TILE = 16
MATMUL_PER_THREAD = 1 << 18


def matmul(name: str, x: torch.Tensor, weights: tuple[torch.Tensor, ...], out_features: int,
           dtype: torch.dtype, *options: int) -> torch.Tensor:
    """y = x W^T by the matmul kernel `name`: rows of x in `dtype` (any leading shape), the
    weight tensors' pointers, y, M, N, K, then `options` and the thread count, as each of
    csrc/qmatmul.c's and csrc/bf16_matmul.c's entry points takes them. y is in `dtype`."""
    rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    m, k = rows.shape
    y = torch.empty(m, out_features, dtype=dtype)
    work = m * out_features * k
    status = kernel(name, work)(rows.data_ptr(), *(w.data_ptr() for w in weights), y.data_ptr(),
                                m, out_features, k, *options,
                                threads_for(work, MATMUL_PER_THREAD))
    if status != 0:
        raise MemoryError(f"{name} could not allocate its row panel")
    return y.view(*x.shape[:-1], out_features)


def threads_for(work: float, per_thread: float) -> int:
    """Threads for a call of `work` (in the caller's units): one where the work is under
    `per_thread`, at most `torch.get_num_threads()`."""
    return max(1, min(torch.get_num_threads(), int(work // per_thread)))
