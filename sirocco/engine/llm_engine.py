"""The synchronous engine: add requests, run steps, collect outputs."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from sirocco.engine.block_manager import BlockManager
from sirocco.engine.config import EngineConfig
from sirocco.engine.errors import DuplicateRequestId, RequestTooLong, UnknownAdapter
from sirocco.engine.model_runner import ModelRunner
from sirocco.engine.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from sirocco.engine.sampling_params import SamplingParams
from sirocco.engine.scheduler import ScheduledBatch, Scheduler
from sirocco.engine.sequence import Sequence
from sirocco.models.config import ModelConfig
from sirocco.models.lora import AdapterWeights

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters (the Prometheus metrics read it)."""

    running_seqs: int
    waiting_seqs: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens looked up
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    preemptions: int


class LLMEngine:
    """Continuous batching on one device. Not thread-safe: `AsyncEngine` drives it from
    its own thread (adapters are added and removed there too, between steps); tests and
    benchmarks call `step` directly.

    A step that raises does not stop the engine: the batch is split in halves and each
    half runs again, down to single sequences, so the requests whose sequences still fail
    alone end with an `error` (see `RequestOutput.error`) and every other one advances.
    Only a device error (CUDA context lost) is raised to the caller.
    """

    def __init__(self, model_config: ModelConfig, state_dict: dict[str, Tensor],
                 config: EngineConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.runner = ModelRunner(model_config, state_dict, config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.adapters: dict[str, int] = {}  # LoRA adapter name -> slot in the runner
        # Slots of removed adapters that running sequences still use: unloaded when the
        # last of them finishes.
        self.retired_slots: set[int] = set()
        self._adapter_loads = 0  # makes each load's prefix-cache seed unique
        self._adapter_keys: dict[str, str] = {}
        self.cache_tokens = self.runner.num_blocks * config.block_size
        self.max_model_len = self.runner.max_model_len
        self.requests: dict[str, list[Sequence]] = {}
        self.generated_tokens = 0
        # Latency observations (seconds) since the last `pop_latencies`, for histograms.
        self.ttft: deque[float] = deque(maxlen=10_000)
        self.itl: deque[float] = deque(maxlen=100_000)

    # -- requests --------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise at once for a request that could never run (RequestTooLong, ValueError)."""
        validate_request(prompt_token_ids, params, self.model_config.vocab_size,
                         self.max_model_len, self.cache_tokens)

    def add_adapter(self, name: str, weights: AdapterWeights) -> None:
        """Make a LoRA adapter (already fused for this model) available to requests. A new
        version of a loaded name gets a slot of its own: sequences running on the old
        weights finish on them."""
        if name in self.adapters:
            self.remove_adapter(name)
        slots = self.runner.lora.adapters
        slot = next(i for i in range(1, len(slots) + 2) if i not in slots)
        slots[slot] = weights
        self.adapters[name] = slot
        self._adapter_loads += 1
        self._adapter_keys[name] = f"{name}#{self._adapter_loads}"

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter: new requests cannot name it; requests running with it
        finish on its weights, which are unloaded after the last of them."""
        slot = self.adapters.pop(name, None)
        self._adapter_keys.pop(name, None)
        if slot is not None:
            self.retired_slots.add(slot)
            self._release_retired_slots()

    def _release_retired_slots(self) -> None:
        if not self.retired_slots:
            return
        in_use = {s.lora_slot for seqs in self.requests.values() for s in seqs
                  if not s.is_finished}
        for slot in self.retired_slots - in_use:
            self.runner.lora.adapters.pop(slot, None)
            self.retired_slots.discard(slot)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None,
                    adapter: str | None = None) -> None:
        self.validate(prompt_token_ids, params)
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded")
        if request_id in self.requests:
            raise DuplicateRequestId(f"request id {request_id!r} is already running")
        seqs = [Sequence(request_id, prompt_token_ids, params, i, arrival_time)
                for i in range(params.n)]
        for seq in seqs:
            if adapter is not None:
                seq.adapter = self._adapter_keys[adapter]
                seq.lora_slot = self.adapters[adapter]
            if params.seed is not None:
                seq.generator = torch.Generator(self.runner.device)
                seq.generator.manual_seed(params.seed + seq.index)
        seqs[0].pending_forks = seqs[1:]
        self.requests[request_id] = seqs
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if the
        request is unknown or already finished)."""
        seqs = self.requests.get(request_id)
        if seqs is None:
            return None
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)  # (also ends choices not yet forked)
        for seq in seqs:
            seq.finish_reason = seq.finish_reason or "abort"
        out = self._output(request_id, seqs, seqs)
        self._release_retired_slots()
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; return what changed for each request.
        A request the step failed for is in the list, finished, with its `error`."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        changed: dict[str, list[Sequence]] = {}
        failures: dict[str, BaseException] = {}
        self._run_isolating(batch, changed, failures)
        outputs = [self._output(rid, self.requests[rid], seqs) for rid, seqs in changed.items()
                   if rid not in failures and rid in self.requests]
        for rid, exc in failures.items():
            out = self.abort(rid)
            if out is not None:
                out.error = f"{type(exc).__name__}: {exc}"
                outputs.append(out)
        self._release_retired_slots()
        return outputs

    def _run_isolating(self, batch: ScheduledBatch, changed: dict[str, list[Sequence]],
                       failures: dict[str, BaseException]) -> None:
        """Run `batch`; if it raises, run each half again (halves of halves, down to one
        sequence): what fails alone is recorded in `failures` by request."""
        try:
            tokens, logprobs = self.runner.execute(batch, self.config.eos_token_ids)
        except Exception as exc:
            if _is_device_lost(exc):
                raise
            if len(batch.seqs) == 1:
                seq = batch.seqs[0]
                logger.error("request %s failed in the engine (the other requests go on)",
                             seq.request_id, exc_info=exc)
                failures.setdefault(seq.request_id, exc)
                return
            logger.warning("a step of %d sequences raised %r; running its halves apart to "
                           "find the request that causes it", len(batch.seqs), exc)
            for part in _halves(batch):
                self._run_isolating(part, changed, failures)
            return
        now = time.monotonic()
        sampled = iter(zip(tokens, logprobs, strict=True))
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            result = next(sampled) if seq.num_computed_tokens + n == len(seq) else None
            try:
                self._advance(seq, n, result, now)
            except Exception as exc:
                logger.error("request %s failed after its step", seq.request_id, exc_info=exc)
                failures.setdefault(seq.request_id, exc)
                continue
            if result is not None:
                changed.setdefault(seq.request_id, []).append(seq)

    def _advance(self, seq: Sequence, n: int, result: tuple[int, TokenLogprob | None] | None,
                 now: float) -> None:
        """Account for `n` computed tokens of `seq` and, at its end, the sampled token."""
        seq.num_computed_tokens += n
        self.block_manager.register_full_blocks(seq)
        if result is None:
            return  # a prefill chunk that did not reach the end of the prompt
        token, logprob = result
        seq.append_token(token, logprob)
        self.generated_tokens += 1
        if seq.last_token_time is None:
            self.ttft.append(now - seq.arrival_time)
        else:
            self.itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        reason = self._finish_reason(seq, token)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[list[int]]]:
        """Run prompts to completion (tests, benchmarks): output token ids per choice."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        results = {rid: [[] for _ in range(p.n)] for rid, p in zip(ids, params_list,
                                                                      strict=True)}
        while self.has_unfinished_requests():
            for out in self.step():
                for choice in out.outputs:
                    results[out.request_id][choice.index] += choice.new_token_ids
        return [results[rid] for rid in ids]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running_seqs=len(self.scheduler.running), waiting_seqs=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_blocks - bm.num_free_blocks, kv_blocks_free=bm.num_free_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, prompt_tokens=bm.prefix_queries,
            cached_prompt_tokens=bm.prefix_hits, generated_tokens=self.generated_tokens,
            preemptions=self.scheduler.num_preemptions)

    def pop_latencies(self) -> tuple[list[float], list[float]]:
        """Time-to-first-token and inter-token latencies (seconds) observed since the last
        call; a Prometheus collector feeds them to its histograms."""
        ttft, itl = list(self.ttft), list(self.itl)
        self.ttft.clear()
        self.itl.clear()
        return ttft, itl

    # -- internals -------------------------------------------------------------------------

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        generated = seq.num_output_tokens
        if generated >= p.min_tokens and (
                token in p.stop_token_ids
                or (not p.ignore_eos and token in self.config.eos_token_ids)):
            return "stop"
        if p.max_tokens is not None and generated >= p.max_tokens:
            return "length"
        if len(seq) >= min(self.max_model_len, self.cache_tokens):
            return "model_length"
        return None

    def _output(self, request_id: str, seqs: list[Sequence], changed: list[Sequence]
                ) -> RequestOutput:
        outputs = []
        for seq in changed:
            prompt_logprobs = None
            if (seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent
                    and seq.num_output_tokens):  # once, with the choice's first token
                prompt_logprobs = seq.prompt_logprobs
                seq.prompt_logprobs_sent = True
            outputs.append(CompletionOutput(
                index=seq.index, new_token_ids=seq.new_token_ids,
                new_logprobs=seq.new_logprobs if seq.params.logprobs is not None else None,
                prompt_logprobs=prompt_logprobs,
                finish_reason=seq.finish_reason, total_token_count=seq.num_output_tokens))
            seq.new_token_ids, seq.new_logprobs = [], []
        finished = all(s.is_finished for s in seqs)
        if finished:
            self.requests.pop(request_id, None)
        parent = seqs[0]
        return RequestOutput(request_id, parent.num_prompt_tokens, parent.num_cached_tokens,
                             outputs, finished)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab: int,
                     max_model_len: int, cache_tokens: int) -> None:
    """Raise RequestTooLong / ValueError for a request that could never run on an engine
    of this vocabulary, context length and KV cache size."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    for limit, what in ((max_model_len, "the model's context length"),
                        (cache_tokens, "the whole KV cache")):
        if n + (params.max_tokens or 1) > limit:
            raise RequestTooLong(n, params.max_tokens, limit, what)
        # min_tokens bans the stop ids until then: beyond the limit it could only run away.
        if params.min_tokens and n + params.min_tokens > limit:
            raise RequestTooLong(n, params.min_tokens, limit, what, field="min_tokens")


def _halves(batch: ScheduledBatch) -> list[ScheduledBatch]:
    """The batch cut in two, each half with the block copies its sequences need."""
    mid = len(batch.seqs) // 2
    parts = []
    for lo, hi in ((0, mid), (mid, len(batch.seqs))):
        seqs = batch.seqs[lo:hi]
        blocks = {b for s in seqs for b in s.block_table}
        parts.append(ScheduledBatch(
            seqs=seqs, num_new_tokens=batch.num_new_tokens[lo:hi],
            block_copies=[(src, dst) for src, dst in batch.block_copies if dst in blocks]))
    return parts


def _is_device_lost(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the device unusable for everyone."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text \
        or "device-side assert" in text
