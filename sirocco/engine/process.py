"""The engine in a process of its own.

The API process keeps HTTP, tokenization, detokenization, grammar compilation for
validation and SSE; the engine process loads the weights, owns the KV cache and runs the
step loop (`EngineLoop`). They share no GIL: a token's way through the server never
stalls the next step, and the step never stalls the server.

One duplex pipe joins them. The API side sends the loop's messages (`loop.py`: requests,
aborts, adapter calls) and ("stop",); the engine side answers ("ready", limits, stats) or
("failed", why) once, then ("news", StepNews) after every step, ("reply", call_id, error)
after a call, and ("died", why) if its loop breaks. A reader thread on the API side turns
those into `AsyncEngine` callbacks. The process is spawned (not forked: the API process
has threads), ignores SIGINT (Ctrl-C reaches the whole process group; the API process
decides when the engine stops) and exits when the pipe closes, so it never outlives the
server. If it dies, the reader sees the pipe close and every stream ends at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from sirocco.engine.config import EngineConfig

if TYPE_CHECKING:
    from sirocco.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine process could not load its model (the message says why)."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine process needs to build its engine (it crosses the pipe)."""

    checkpoint: str  # a path inspect_checkpoint() reads
    config: EngineConfig
    request_timeout: float | None = None
    threads: int | None = None  # compute threads (None: the default for the cores)
    log_level: str = "info"
    name: str = "model"  # for the process title and the logs


class EngineProcess:
    """The core of an `AsyncEngine` that runs in a spawned process. Construction starts the
    process (it loads while the caller goes on); `wait_ready` waits for it."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_engine_main, args=(child_conn, spec),
                                       name=f"sirocco-engine-{spec.name}", daemon=True)
        self.process.start()
        child_conn.close()
        self.limits: dict[str, Any] = {}
        self.stats: Any = None
        self._lock = threading.Lock()
        # Messages wait here for the writer thread: a full pipe (the engine busy in a long
        # step while big prompts arrive) never blocks the event loop or the reader.
        self._outbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._client: AsyncEngine | None = None
        self._closed = False
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the engine has loaded (EngineStartError if it could not)."""
        if self._ready:
            return
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise EngineStartError(f"the engine process for {self.spec.name} exited while "
                                   f"loading (exit code {self.process.exitcode})") from None
        if message[0] == "failed":
            self.process.join(5)
            raise EngineStartError(message[1])
        _, self.limits, self.stats = message
        self._ready = True
        logger.info("engine process for %s: pid %d", self.spec.name, self.process.pid)

    # -- the Core protocol -----------------------------------------------------------------

    def bind(self, client: AsyncEngine) -> None:
        self.wait_ready()
        self._client = client
        self.start()  # (the loop is running already: so are the threads that talk to it)

    def start(self) -> None:
        with self._lock:
            if self._reader is not None:
                return
            name = self.spec.name
            self._reader = threading.Thread(target=self._read, daemon=True,
                                            name=f"sirocco-engine-reader-{name}")
            self._writer = threading.Thread(target=self._write, daemon=True,
                                            name=f"sirocco-engine-writer-{name}")
            self._reader.start()
            self._writer.start()

    def send(self, message: tuple) -> None:
        self._outbox.put(message)

    def stop(self, timeout: float | None) -> None:
        self._closed = True
        if self._writer is None:
            self._conn.close()  # never bound: the closed pipe ends the process
        else:
            self._outbox.put(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process for %s did not stop: killing it",
                           self.spec.name)
            self.process.kill()
            self.process.join(5)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def alive(self) -> bool:
        return self.process.is_alive() and not self._closed

    # -- the writer and reader threads -----------------------------------------------------

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the process is gone: the reader reports it
                return
            if message[0] == "stop":
                return

    def _read(self) -> None:
        client = self._client
        assert client is not None
        reason: str | None = None
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "stopped":
                    break
                if kind == "died":
                    reason = message[1]
                    break
                try:
                    if kind == "news":
                        client.on_news(message[1])
                    elif kind == "reply":
                        client.on_reply(message[1], message[2])
                except Exception:  # a bug here must not leave every stream waiting
                    logger.exception("engine process %s: could not hand over %s",
                                     self.spec.name, kind)
        except (EOFError, OSError):
            self.process.join(2)
            code = self.process.exitcode
            reason = (f"the engine process exited (exit code {code})" if code is not None
                      else "the engine process stopped answering")
        if reason is not None:
            logger.error("model %s: %s", self.spec.name, reason)
        self._conn.close()
        self._closed = True
        client.on_exit(reason)


# -- the engine process ------------------------------------------------------------------


def _engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The engine process: load, say ready, run the loop until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), datefmt="%H:%M:%S",
                        format=f"%(asctime)s %(levelname)s [engine {spec.name}] "
                               "%(name)s: %(message)s")
    try:
        engine = _load(spec)
    except BaseException as exc:  # reported to the API process, which refuses to start
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    from sirocco.engine.loop import EngineLoop, engine_limits

    conn.send(("ready", engine_limits(engine), engine.stats()))
    loop = EngineLoop(engine, spec.request_timeout,
                      emit=lambda news: conn.send(("news", news)),
                      reply=lambda call_id, error: conn.send(("reply", call_id, error)))
    try:
        while True:
            if not loop.busy:
                conn.poll(None)  # idle: sleep until a message (or the pipe closes)
            while conn.poll():
                message = conn.recv()
                if message[0] == "stop":
                    loop.fail_all()
                    conn.send(("stopped",))
                    return
                loop.apply(message)
            loop.run_once()
    except (EOFError, BrokenPipeError):
        return  # the API process is gone
    except Exception as exc:
        logging.getLogger(__name__).exception("engine step failed")
        try:
            conn.send(("died", f"the engine stopped: {exc!r}"))
        except OSError:
            pass


def _load(spec: EngineSpec) -> Any:
    from sirocco.engine.config import set_compute_threads
    from sirocco.engine.llm_engine import LLMEngine
    from sirocco.models.loader import inspect_checkpoint, load_tokenizer, load_weights
    from sirocco.structured import grammar_vocabulary

    set_compute_threads(spec.threads, engine_process=True)
    ckpt = inspect_checkpoint(spec.checkpoint)
    # Grammar constraints arrive as grammar text: this process compiles them on its own
    # copy of the vocabulary.
    grammar_vocabulary(load_tokenizer(ckpt))
    weights = load_weights(ckpt, spec.config.dtype,
                           q4_1_blocks=spec.config.quantization == "int4")
    return LLMEngine(ckpt.config, weights, spec.config)
