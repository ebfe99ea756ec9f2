"""The engine as the server sees it: an async stream per request, the loop in a thread.

The step loop runs in one background thread, so the server's asyncio loop never waits
for the model. Requests and aborts are handed to the thread through a locked inbox and
applied between steps; each step's outputs go back to the waiting coroutines with
`loop.call_soon_threadsafe`. Adding and removing LoRA adapters also runs in the loop
thread between steps, so a step never sees the adapter table change under it.

Admission is bounded: at most `max_num_seqs + max_waiting` engine requests are in
flight; past that `generate` raises `EngineOverloaded` (the server's 429). With a
`request_timeout`, a request still unfinished that many seconds after it was submitted
is aborted between steps (its blocks freed) and its stream raises `RequestTimedOut`.
A step that fails for one request fails that request's stream with `RequestFailed`; the
loop goes on. Only an unrecoverable error (a lost device) stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sirocco.engine.errors import (
    DuplicateRequestId,
    EngineOverloaded,
    RequestFailed,
    RequestTimedOut,
    UnknownAdapter,
)
from sirocco.engine.llm_engine import EngineStats, LLMEngine
from sirocco.engine.outputs import RequestOutput
from sirocco.engine.sampling_params import SamplingParams
from sirocco.models.lora import load_peft_adapter

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised)."""


class AsyncEngine:
    """Runs an `LLMEngine` in a background thread and streams its outputs to coroutines."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        # Requests beyond the running batch that may wait; the default is twice the batch
        # the engine can hold (--max-num-seqs, and at least one KV block per sequence).
        batch = min(engine.config.max_num_seqs, engine.runner.num_blocks)
        self.max_waiting = 2 * batch if max_waiting is None else max_waiting
        self.max_in_flight = engine.config.max_num_seqs + self.max_waiting
        self.request_timeout = request_timeout or None  # seconds; None or 0: no deadline
        self.rejected_requests = 0  # refused with EngineOverloaded
        self.timed_out_requests = 0
        self.failed_requests = 0  # ended by a step that raised for them
        self._in_flight = 0
        self._mean_duration = 1.0  # seconds a request takes, moving average (Retry-After)
        self._deadlines: dict[str, float] = {}  # loop thread only
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams, float, str | None]] = []
        self._aborts: list[str] = []
        self._commands: list[_Command] = []
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
        streaming), UnknownAdapter, EngineOverloaded when admission is full,
        EngineDeadError if the loop has stopped. Later ones may raise RequestFailed or
        RequestTimedOut. Leaving the iteration early aborts the request."""
        if self._dead is not None:
            raise self._dead
        self.engine.validate(prompt_token_ids, params)
        if adapter is not None and adapter not in self.engine.adapters:
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead is not None:  # (checked again: the loop may have died meanwhile)
                raise self._dead
            if request_id in self._streams:
                raise DuplicateRequestId(f"request id {request_id!r} is already running")
            self._admit(1)
            self._in_flight += 1
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((request_id, list(prompt_token_ids), params, time.monotonic(),
                               adapter))
        started = time.monotonic()
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
                self._in_flight -= 1
                if finished:
                    self._mean_duration += 0.1 * (time.monotonic() - started
                                                  - self._mean_duration)

    def check_admission(self, count: int = 1) -> None:
        """Raise EngineOverloaded now if `count` more requests would not be admitted."""
        with self._lock:
            self._admit(count)

    def _admit(self, count: int) -> None:  # (with the lock held)
        if self._in_flight + count > self.max_in_flight:
            self.rejected_requests += 1
            waiting = self._in_flight - self.engine.config.max_num_seqs
            raise EngineOverloaded(
                f"the server is at capacity ({self.engine.config.max_num_seqs} running and "
                f"{max(waiting, 0)} waiting requests, --max-waiting {self.max_waiting}); "
                "retry later", retry_after=self.retry_after())

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's duration, 1 to 60."""
        return max(1, min(60, math.ceil(self._mean_duration)))

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestTooLong / ValueError now for a request that could never run."""
        self.engine.validate(prompt_token_ids, params)

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter from `path` and serve it as `name` (LoRAError if it
        does not fit this model). The base weights are shared, never copied. Blocks until
        the loop thread has installed it between two steps (call it off the event loop)."""
        runner = self.engine.runner
        weights = load_peft_adapter(path, runner.model_config, runner.dtype, runner.device)
        self._call_in_loop(lambda: self.engine.add_adapter(name, weights))

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests are refused at once; requests running on
        it finish on it, and its weights are unloaded after them. Blocks until the loop
        thread has applied it (call it off the event loop)."""
        self._call_in_loop(lambda: self.engine.remove_adapter(name))

    def _call_in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the loop thread between steps (directly when no loop runs)."""
        command = _Command(fn)
        with self._lock:
            if not self.is_running or threading.current_thread() is self._thread:
                return fn()
            self._commands.append(command)
        self._wakeup.set()
        while not command.done.wait(0.1):
            with self._lock:  # the loop stopped before taking it: run it here
                if not self.is_running and command in self._commands:
                    self._commands.remove(command)
                    return fn()
        if command.error is not None:
            raise command.error
        return command.result

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
                    commands, self._commands = self._commands, []
                    self._wakeup.clear()
                for request_id, prompt, params, arrival, adapter in adds:
                    try:
                        engine.add_request(request_id, prompt, params, arrival, adapter)
                    except Exception as exc:  # validated already: an adapter removed since
                        self._deliver(request_id, exc)
                        continue
                    if self.request_timeout:
                        self._deadlines[request_id] = arrival + self.request_timeout
                for request_id in aborts:
                    out = engine.abort(request_id)
                    if out is not None:
                        self._deliver(request_id, out)
                for command in commands:
                    command.run()
                self._expire()
                if not engine.has_unfinished_requests():
                    self._publish_stats()
                    self._wakeup.wait()
                    continue
                outputs = engine.step()
                self._publish_stats()
                for out in outputs:
                    if out.error is not None:
                        self.failed_requests += 1
                        self._deliver(out.request_id, RequestFailed(
                            f"the engine could not run this request ({out.error})"))
                    else:
                        self._deliver(out.request_id, out)
        except Exception as exc:
            logger.exception("engine step failed")
            self._dead = EngineDeadError(f"the engine stopped: {exc!r}")
            self._fail_all(self._dead)
            return
        self._fail_all(EngineDeadError("the engine was shut down"))

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
                self.timed_out_requests += 1
                self._deliver(request_id, RequestTimedOut(self.request_timeout or 0))

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
            commands, self._commands = self._commands, []
        for command in commands:  # (nobody else will run them now)
            command.run()
        for request_id in streams:
            self._deliver(request_id, exc)


class _Command:
    """A call handed to the loop thread, and its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed back to the caller
            self.error = exc
        finally:
            self.done.set()
