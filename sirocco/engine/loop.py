"""The step loop's body, and the plain messages it takes and gives.

`EngineLoop` owns an `LLMEngine` and is driven by one thread: it applies the messages
submitted since the last step (new requests, aborts, adapter commands), ends the requests
past their deadline, runs a step and hands what changed to `emit` as one `StepNews`.
The same loop runs in a thread of the server (`AsyncEngine`'s in-process mode) and in
the engine process (`sirocco.engine.process`): its messages are tuples of plain values,
so they cross a pipe as they are.

Messages in:
    ("add", request_id, prompt_token_ids, params, arrival_time, adapter)
    ("abort", request_id)
    ("call", call_id, "add_adapter", (name, path)) | ("call", call_id, "remove_adapter", (name,))
Out: `emit(StepNews)` after every step (and after aborts), `reply(call_id, error)` after a
call, where `error` is None or (exception class name, message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sirocco.engine.llm_engine import EngineStats, LLMEngine
from sirocco.engine.outputs import RequestOutput
from sirocco.models.lora import load_peft_adapter

logger = logging.getLogger(__name__)

Failure = tuple[str, str, str]
"""(request id, the error's class name, message): a request the loop ended with an error.
Class names: "RequestFailed" (a step raised for it), "RequestTimedOut", "UnknownAdapter"
(its adapter was removed between submit and admission)."""


@dataclass(slots=True)
class StepNews:
    """What one pass of the loop changed: outputs, failures, the engine's gauges, and the
    latencies observed since the last news."""

    outputs: list[RequestOutput]
    failures: list[Failure]
    stats: EngineStats
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


class EngineLoop:
    """Applies messages between steps and runs the steps of one `LLMEngine`."""

    def __init__(self, engine: LLMEngine, request_timeout: float | None,
                 emit: Callable[[StepNews], None],
                 reply: Callable[[int, tuple[str, str] | None], None]) -> None:
        self.engine = engine
        self.request_timeout = request_timeout or None
        self._emit = emit
        self._reply = reply
        self._deadlines: dict[str, float] = {}
        self._outputs: list[RequestOutput] = []
        self._failures: list[Failure] = []

    @property
    def busy(self) -> bool:
        """Whether a step has work to do."""
        return self.engine.has_unfinished_requests()

    def apply(self, message: tuple) -> None:
        """Apply one submitted message (see the module's docstring)."""
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, arrival, adapter = message
            try:
                self.engine.add_request(request_id, prompt, params, arrival, adapter)
            except Exception as exc:  # validated at submit: an adapter removed since
                self._failures.append((request_id, type(exc).__name__, str(exc)))
                return
            if self.request_timeout:
                self._deadlines[request_id] = arrival + self.request_timeout
        elif kind == "abort":
            out = self.engine.abort(message[1])
            if out is not None:
                self._outputs.append(out)
        elif kind == "call":
            _, call_id, name, args = message
            try:
                getattr(self, f"_{name}")(*args)
            except Exception as exc:  # handed back to the caller
                self._reply(call_id, (type(exc).__name__, str(exc)))
            else:
                self._reply(call_id, None)
        else:
            raise ValueError(f"unknown engine message {kind!r}")

    def run_once(self) -> None:
        """End the requests past their deadline, run one step if there is work, and emit
        the news (with fresh stats, even when idle)."""
        self._expire()
        if self.busy:
            for out in self.engine.step():
                if out.error is not None:
                    self._failures.append((out.request_id, "RequestFailed",
                                           f"the engine could not run this request "
                                           f"({out.error})"))
                else:
                    self._outputs.append(out)
        self._flush()

    def _flush(self) -> None:
        """Emit the news gathered since the last emit, with the engine's current stats."""
        ttft, itl = self.engine.pop_latencies()
        news = StepNews(self._outputs, self._failures, self.engine.stats(), ttft, itl)
        self._outputs, self._failures = [], []
        self._emit(news)

    def fail_all(self) -> None:
        """Abort every request and free its blocks (the loop is stopping: their streams
        are ended by whoever stops it), then emit the final stats."""
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        self._outputs, self._failures, self._deadlines = [], [], {}
        self._flush()

    # -- calls -----------------------------------------------------------------------------

    def _add_adapter(self, name: str, path: str) -> None:
        # (Read here, between two steps: a LoRA adapter is a few MB, read in milliseconds.)
        runner = self.engine.runner
        weights = load_peft_adapter(Path(path), runner.model_config, runner.dtype,
                                    runner.device)
        self.engine.add_adapter(name, weights)

    def _remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    # -- internals -------------------------------------------------------------------------

    def _expire(self) -> None:
        """Abort the requests past their deadline; forget those that finished."""
        if not self._deadlines:
            return
        now = time.monotonic()
        for request_id, deadline in list(self._deadlines.items()):
            if request_id not in self.engine.requests:
                del self._deadlines[request_id]
            elif now >= deadline:
                del self._deadlines[request_id]
                self.engine.abort(request_id)
                self._failures.append((request_id, "RequestTimedOut", ""))


def engine_limits(engine: LLMEngine) -> dict[str, Any]:
    """What a client needs to validate and admit requests without the engine at hand."""
    return {
        "vocab_size": engine.model_config.vocab_size,
        "max_model_len": engine.max_model_len,
        "cache_tokens": engine.cache_tokens,
        "max_num_seqs": engine.config.max_num_seqs,
        "num_blocks": engine.runner.num_blocks,
    }
