"""Engine settings (the `--kv-cache-memory`, `--max-num-seqs`, ... flags land here)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """How the engine uses its device.

    kv_cache_memory: bytes for the paged KV cache; None takes a sensible share of the
        free memory (see `default_kv_cache_memory`).
    max_model_len: longest sequence (prompt + output); None uses the model's
        `max_position_embeddings`. It is further capped by what the KV cache holds.
    dtype: "auto", "float32", "bfloat16", "float16" or a torch.dtype; "auto" picks
        bfloat16 where the device runs it fast (see `resolve_dtype`).
    eos_token_ids: the model's end-of-sequence ids: a sequence stops on them unless its
        params say `ignore_eos`.
    quantization: "auto", "none", "int8" or "int4": weight-only quantized linear layers
        (`models/quantized.py`).
    decoder_stack: run the decoder layers of a step in one C call where every layer is on
        Sirocco's kernels (`models/decoder_stack.py`; the same results); False runs them
        from Python.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "cpu"
    enable_prefix_caching: bool = True
    eos_token_ids: tuple[int, ...] = ()
    quantization: str = "auto"
    decoder_stack: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size and max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.eos_token_ids = tuple(self.eos_token_ids)


# On a CPU, "auto" keeps models below this size in float32. Measured on SmolLM2-135M-Instruct
# (the default model): in bfloat16 its first greedy token for "What is the capital of
# France?" ties with a wrong one (logprob -1.96 each) and the answer depends on rounding;
# in float32 it answers as transformers' float32 greedy decoding does. A model this small
# costs little in float32.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def resolve_dtype(dtype: str | torch.dtype, device: str,
                  num_parameters: int | None = None) -> torch.dtype:
    """The torch dtype for `dtype`; "auto" is bfloat16 on a GPU that supports it or a CPU
    with AMX / AVX512-BF16 instructions, float32 otherwise, and float32 on a CPU for a model
    of fewer than `SMALL_MODEL_PARAMETERS` weights (it logs what it picked and why)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}") from None
    if device.startswith("cuda"):
        picked = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif num_parameters is not None and num_parameters < SMALL_MODEL_PARAMETERS:
        logger.info("dtype auto: picked float32 for %s: a model of %.0fM parameters keeps "
                    "float32's greedy answers at little cost (bfloat16 rounding changes "
                    "them)", device, num_parameters / 1e6)
        return torch.float32
    else:
        picked = torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    logger.info("dtype auto: picked %s for %s", picked, device)
    return picked


def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cores: int, engine_process: bool = False) -> int:
    """Compute threads for `cores` cores. An engine in a process of its own takes them all:
    the server's work (HTTP, tokenization, streaming) is a small share of a core and does
    not hold that process's GIL. Measured on 2 cores over HTTP with SmolLM2 int4, 2 threads
    there against 1: 46 vs 31 tok/s at one stream, 254 vs 154 at sixteen. Sharing the
    server's process (an engine thread, or the embedding model), it leaves one core to the
    server: a parallel region waits for its slowest thread, and the event loop kept taking
    a core from one of them. (vLLM-CPU makes the same choice.)"""
    return cores if engine_process else max(1, cores - 1)


def set_compute_threads(requested: int | None = None, engine_process: bool = False) -> int:
    """Set the compute threads of this process (PyTorch's pool, which Sirocco's kernels
    share): `requested`, else `default_threads`. Logs the choice; returns it."""
    cores = available_cores()
    threads = requested or default_threads(cores, engine_process)
    torch.set_num_threads(threads)
    if requested:
        how = "--threads"
    elif engine_process:
        how = "all of them: the engine's own process; --threads overrides"
    else:
        how = "one core left to the server; --threads overrides"
    logger.info("compute threads: %d of %d cores (%s)", threads, cores, how)
    if threads > cores:
        logger.warning("--threads %d is more than the %d cores available: threads will wait "
                       "for each other", threads, cores)
    return threads


CPU_KV_CACHE_CAP = 2 * 1024**3


def default_kv_cache_memory(device: str, max_tokens_useful: int, bytes_per_token: int) -> int:
    """A sensible KV budget: 80% of free GPU memory, or on CPU 25% of available RAM up to
    2 GiB (like vLLM's CPU default, it leaves RAM to the other models of the process and
    keeps start-up short: the cache is zeroed), never more than the cache that
    `max_num_seqs` full-length sequences could use."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        share = int(free * 0.8)
    else:
        import psutil

        share = min(int(psutil.virtual_memory().available * 0.25), CPU_KV_CACHE_CAP)
    return min(share, max_tokens_useful * bytes_per_token)
