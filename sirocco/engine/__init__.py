"""The inference engine: continuous batching over a paged, prefix-cached KV cache.

`build_engine(model_config, state_dict, engine_config)` gives an `AsyncEngine` whose step
loop runs in a thread (tests, benchmarks, `--engine thread`); the server's engines run in
processes of their own (`sirocco.engine.process.EngineProcess`, which loads the weights
itself). `LLMEngine` is the synchronous core.
"""

from __future__ import annotations

from torch import Tensor

from sirocco.engine.async_engine import AsyncEngine, EngineDeadError
from sirocco.engine.config import EngineConfig, resolve_dtype
from sirocco.engine.errors import (
    DuplicateRequestId,
    EngineError,
    EngineOverloaded,
    RequestFailed,
    RequestTimedOut,
    RequestTooLong,
    UnknownAdapter,
)
from sirocco.engine.llm_engine import EngineStats, LLMEngine
from sirocco.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from sirocco.engine.sampling_params import SamplingParams
from sirocco.models.config import ModelConfig

__all__ = [
    "AsyncEngine", "CompletionOutput", "DuplicateRequestId", "EngineConfig", "EngineDeadError",
    "EngineError", "EngineOverloaded", "EngineStats", "LLMEngine", "RequestFailed",
    "RequestOutput", "RequestTimedOut", "RequestTooLong", "SamplingParams", "TokenLogprob",
    "UnknownAdapter", "build_engine", "resolve_dtype",
]


def build_engine(model_config: ModelConfig, state_dict: dict[str, Tensor],
                 engine_config: EngineConfig, max_waiting: int | None = None,
                 request_timeout: float | None = None) -> AsyncEngine:
    """Load the weights onto the device, size the KV cache, start the step loop.
    `max_waiting` and `request_timeout`: see `AsyncEngine`."""
    engine = AsyncEngine(LLMEngine(model_config, state_dict, engine_config),
                         max_waiting=max_waiting, request_timeout=request_timeout)
    engine.start()
    return engine
