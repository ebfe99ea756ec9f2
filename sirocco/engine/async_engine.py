"""The engine as the server sees it: an async stream per request, the loop elsewhere.

The step loop (`EngineLoop`) runs in a "core": by default a process of its own
(`sirocco.engine.process.EngineProcess`), so tokenization, detokenization and HTTP never
take the GIL from the model; or a thread of this process (`ThreadCore`: tests,
benchmarks, `--engine thread`). Requests, aborts and adapter commands go to the core
as plain messages and are applied between steps; each step's news comes back from the
core's thread and is handed to the waiting coroutines with `loop.call_soon_threadsafe`.

Admission is bounded here: at most `max_num_seqs + max_waiting` engine requests are in
flight; past that `generate` raises `EngineOverloaded` (the server's 429). With a
`request_timeout`, a request still unfinished that many seconds after it was submitted
is aborted between steps (its blocks freed) and its stream raises `RequestTimedOut`.
A step that fails for one request fails that request's stream with `RequestFailed`; the
loop goes on. If the loop stops for good (a lost device, a dead engine process), every
stream ends with `EngineDeadError` at once and so does every later request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from sirocco.engine.errors import (
    DuplicateRequestId,
    EngineOverloaded,
    RequestFailed,
    RequestTimedOut,
    UnknownAdapter,
)
from sirocco.engine.llm_engine import EngineStats, LLMEngine, validate_request
from sirocco.engine.loop import EngineLoop, StepNews, engine_limits
from sirocco.engine.outputs import RequestOutput
from sirocco.engine.sampling_params import SamplingParams
from sirocco.models.lora import LoRAError

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, a step raised, its process died)."""


class Core(Protocol):
    """Where the step loop runs. It calls back `on_news`, `on_reply` and `on_exit` of the
    `AsyncEngine` it was started for, from a thread of its own."""

    limits: dict[str, Any]  # engine_limits()
    stats: EngineStats  # as of start

    def bind(self, client: AsyncEngine) -> None: ...
    def start(self) -> None: ...
    def send(self, message: tuple) -> None: ...
    def stop(self, timeout: float | None) -> None: ...
    def alive(self) -> bool: ...


class AsyncEngine:
    """Streams the outputs of an engine loop that runs in `core` (a `ThreadCore` for an
    `LLMEngine` given directly) to coroutines."""

    def __init__(self, engine: LLMEngine | Core, max_waiting: int | None = None,
                 request_timeout: float | None = None) -> None:
        self.request_timeout = request_timeout or None  # seconds; None or 0: no deadline
        self.core: Core = (ThreadCore(engine, self.request_timeout)
                           if isinstance(engine, LLMEngine) else engine)
        self.core.bind(self)  # (an engine process: once it has loaded)
        self.limits = self.core.limits
        # Requests beyond the running batch that may wait; the default is twice the batch
        # the engine can hold (--max-num-seqs, and at least one KV block per sequence).
        batch = min(self.limits["max_num_seqs"], self.limits["num_blocks"])
        self.max_waiting = 2 * batch if max_waiting is None else max_waiting
        self.max_in_flight = self.limits["max_num_seqs"] + self.max_waiting
        self.rejected_requests = 0  # refused with EngineOverloaded
        self.timed_out_requests = 0
        self.failed_requests = 0  # ended by a step that raised for them
        self.adapters: set[str] = set()  # LoRA adapters the loop serves
        self._in_flight = 0
        self._mean_duration = 1.0  # seconds a request takes, moving average (Retry-After)
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, _PendingCall] = {}
        self._call_ids = itertools.count()
        self._dead: EngineDeadError | None = None
        self._stats = self.core.stats
        self._ttft: list[float] = []
        self._itl: list[float] = []

    @property
    def engine(self) -> LLMEngine | None:
        """The `LLMEngine` itself when it runs in this process (tests), else None."""
        return getattr(self.core, "engine", None)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop (idempotent; `generate` starts it too)."""
        self.core.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; unfinished requests end with an EngineDeadError."""
        self.core.stop(timeout)

    @property
    def is_running(self) -> bool:
        return self._dead is None and self.core.alive()

    # -- requests --------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs step by step (new tokens only), the
        last with `finished`. `adapter` names a LoRA adapter added with `add_adapter`
        (None: the base model). The first `__anext__` raises RequestTooLong / ValueError for
        a request that can never run (call `validate` first to answer 4xx before
        streaming), UnknownAdapter, EngineOverloaded when admission is full,
        EngineDeadError if the loop has stopped. Later ones may raise RequestFailed,
        RequestTimedOut or EngineDeadError. Leaving the iteration early aborts the request."""
        if self._dead is not None:
            raise self._dead
        self.validate(prompt_token_ids, params)
        if adapter is not None and adapter not in self.adapters:
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
        started = time.monotonic()
        finished = False
        try:
            self.start()
            self.core.send(("add", request_id, list(prompt_token_ids), params, started,
                            adapter))
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
            running = self.limits["max_num_seqs"]
            raise EngineOverloaded(
                f"the server is at capacity ({running} running and "
                f"{max(self._in_flight - running, 0)} waiting requests, --max-waiting "
                f"{self.max_waiting}); retry later", retry_after=self.retry_after())

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's duration, 1 to 60."""
        return max(1, min(60, math.ceil(self._mean_duration)))

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestTooLong / ValueError now for a request that could never run."""
        limits = self.limits
        validate_request(prompt_token_ids, params, limits["vocab_size"],
                         limits["max_model_len"], limits["cache_tokens"])

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter from `path` and serve it as `name` (LoRAError if it
        does not fit this model). The base weights are shared, never copied. Blocks until
        the loop has installed it between two steps (call it off the event loop)."""
        self._call("add_adapter", name, str(path))
        self.adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests are refused at once; requests running on
        it finish on it, and its weights are unloaded after them. Blocks until the loop
        has applied it (call it off the event loop)."""
        self.adapters.discard(name)
        self._call("remove_adapter", name)

    def _call(self, name: str, *args: Any) -> None:
        if self._dead is not None:
            raise self._dead
        call = _PendingCall()
        with self._lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = call
        self.core.send(("call", call_id, name, args))
        call.done.wait()
        if call.error is not None:
            raise call.error

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step. Its stream (if
        still read) ends with a finish_reason "abort"."""
        if self._dead is None:
            self.core.send(("abort", request_id))

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

    # -- called back from the core's thread ------------------------------------------------

    def on_news(self, news: StepNews) -> None:
        self._stats = news.stats
        with self._lock:
            self._ttft += news.ttft
            self._itl += news.itl
        items: list[tuple[str, RequestOutput | BaseException]] = [
            (out.request_id, out) for out in news.outputs]
        for request_id, kind, message in news.failures:
            items.append((request_id, self._failure(kind, message)))
        self._deliver(items)

    def on_reply(self, call_id: int, error: tuple[str, str] | None) -> None:
        with self._lock:
            call = self._calls.pop(call_id, None)
        if call is not None:
            call.finish(None if error is None else _rebuild_error(*error))

    def on_exit(self, reason: str | None) -> None:
        """The loop stopped: shut down (`reason` None) or died. Ends every stream and call."""
        error = EngineDeadError(reason or "the engine was shut down")
        if reason is not None:
            self._dead = error
        with self._lock:
            streams = list(self._streams)
            calls, self._calls = self._calls, {}
        for call in calls.values():
            call.finish(error)
        self._deliver([(request_id, error) for request_id in streams])

    def _failure(self, kind: str, message: str) -> BaseException:
        if kind == "RequestTimedOut":
            self.timed_out_requests += 1
            return RequestTimedOut(self.request_timeout or 0)
        if kind == "RequestFailed":
            self.failed_requests += 1
        return _rebuild_error(kind, message)

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            targets = [(request_id, item, self._streams.get(request_id))
                       for request_id, item in items]
        for request_id, item, target in targets:
            if target is None:
                if isinstance(item, RequestOutput) and not item.finished:
                    self.abort(request_id)  # nobody is listening any more
                continue
            loop, queue = target
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the listener's event loop is closed
                for _queue, item in puts:
                    if isinstance(item, RequestOutput) and not item.finished:
                        self.abort(item.request_id)


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)


_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (RequestFailed, UnknownAdapter, LoRAError, ValueError)}


def _rebuild_error(kind: str, message: str) -> Exception:
    """The exception a loop reported by class name and message."""
    cls = _ERRORS.get(kind)
    return cls(message) if cls is not None else RuntimeError(f"{kind}: {message}")


class _PendingCall:
    """An adapter command sent to the loop, and its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


class ThreadCore:
    """The step loop in a thread of this process (one `LLMEngine` at hand)."""

    def __init__(self, engine: LLMEngine, request_timeout: float | None) -> None:
        self.engine = engine
        self.request_timeout = request_timeout
        self.limits = engine_limits(engine)
        self.stats = engine.stats()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: list[tuple] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: EngineLoop
        self._client: AsyncEngine

    def bind(self, client: AsyncEngine) -> None:
        self._client = client
        self._loop = EngineLoop(self.engine, self.request_timeout, client.on_news,
                                client.on_reply)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="sirocco-engine",
                                            daemon=True)
            self._thread.start()

    def send(self, message: tuple) -> None:
        with self._lock:
            if message[0] == "call" and not self.alive():
                self._loop.apply(message)  # no loop runs: apply it here
                return
            self._inbox.append(message)
        self._wakeup.set()

    def stop(self, timeout: float | None) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        loop = self._loop
        reason: str | None = None
        try:
            while not self._stopping:
                with self._lock:
                    messages, self._inbox = self._inbox, []
                    self._wakeup.clear()
                for message in messages:
                    loop.apply(message)
                loop.run_once()
                if not loop.busy:
                    self._wakeup.wait()
        except Exception as exc:
            logger.exception("engine step failed")
            reason = f"the engine stopped: {exc!r}"
        loop.fail_all()
        with self._lock:  # calls nobody will run now: run them here
            calls = [m for m in self._inbox if m[0] == "call"]
            self._inbox = []
        for message in calls:
            loop.apply(message)
        self._client.on_exit(reason)
