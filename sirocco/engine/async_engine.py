"""The engine as the server sees it: an async stream per request, the loop in a thread.

The step loop runs in one background thread, so the server's asyncio loop never waits
for the model. Requests and aborts are handed to the thread through a locked inbox and
applied between steps; each step's outputs go back to the waiting coroutines with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from sirocco.engine.errors import DuplicateRequestId
from sirocco.engine.llm_engine import EngineStats, LLMEngine
from sirocco.engine.outputs import RequestOutput
from sirocco.engine.sampling_params import SamplingParams
from sirocco.models.lora import load_peft_adapter

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised)."""


class AsyncEngine:
    """Runs an `LLMEngine` in a background thread and streams its outputs to coroutines."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams, float, str | None]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._stats = engine.stats()
        self._ttft: list[float] = []
        self._itl: list[float] = []

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop (idempotent; `generate` starts it too)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="sirocco-engine",
                                            daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; unfinished requests end with an EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests --------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs step by step (new tokens only), the
        last with `finished`. `adapter` names a LoRA adapter added with `add_adapter`
        (None: the base model). The first `__anext__` raises RequestTooLong / ValueError for
        a request that can never run (call `validate` first to answer 4xx before
        streaming), EngineDeadError if a step failed earlier. Leaving the iteration early
        aborts the request."""
        if self._dead is not None:
            raise self._dead
        self.engine.validate(prompt_token_ids, params)
        if adapter is not None and adapter not in self.engine.adapters:
            raise ValueError(f"unknown adapter {adapter!r}")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead is not None:  # (checked again: the loop may have died meanwhile)
                raise self._dead
            if request_id in self._streams:
                raise DuplicateRequestId(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((request_id, list(prompt_token_ids), params, time.monotonic(),
                               adapter))
        self.start()
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestTooLong / ValueError now for a request that could never run."""
        self.engine.validate(prompt_token_ids, params)

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter from `path` and serve it as `name` (LoRAError if it
        does not fit this model). The base weights are shared, never copied."""
        runner = self.engine.runner
        weights = load_peft_adapter(path, runner.model_config, runner.dtype, runner.device)
        with self._lock:  # the loop thread reads the adapter tables between steps
            self.engine.add_adapter(name, weights)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self.engine.remove_adapter(name)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step. Its stream (if
        still read) ends with a finish_reason "abort"."""
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        """The gauges and counters as of the last step."""
        return self._stats

    def pop_latencies(self) -> tuple[list[float], list[float]]:
        """(time to first token, inter-token latency) observations in seconds since the
        last call, for Prometheus histograms."""
        with self._lock:
            ttft, itl = self._ttft, self._itl
            self._ttft, self._itl = [], []
        return ttft, itl

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    self._wakeup.clear()
                for request_id, prompt, params, arrival, adapter in adds:
                    try:
                        engine.add_request(request_id, prompt, params, arrival, adapter)
                    except Exception as exc:  # validated already; anything else is ours
                        self._deliver(request_id, exc)
                for request_id in aborts:
                    out = engine.abort(request_id)
                    if out is not None:
                        self._deliver(request_id, out)
                if not engine.has_unfinished_requests():
                    self._publish_stats()
                    self._wakeup.wait()
                    continue
                outputs = engine.step()
                self._publish_stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except Exception as exc:
            logger.exception("engine step failed")
            self._dead = EngineDeadError(f"the engine stopped: {exc!r}")
            self._fail_all(self._dead)
            return
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _publish_stats(self) -> None:
        ttft, itl = self.engine.pop_latencies()
        with self._lock:
            self._ttft += ttft
            self._itl += itl
        self._stats = self.engine.stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            if isinstance(item, RequestOutput) and not item.finished:
                self.engine.abort(request_id)  # nobody is listening any more
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the listener's event loop is closed
            self.engine.abort(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)  # free the blocks first
        self._stats = self.engine.stats()
        with self._lock:
            streams = list(self._streams)
        for request_id in streams:
            self._deliver(request_id, exc)
