"""From prompt token ids to choice deltas: the part chat and FIM completions share.

Each choice of a request is one engine request, so a choice that meets a stop string can
be stopped alone (the prompt's KV blocks are shared through the prefix cache). The
engine gives token ids; this module turns them into what the wire carries: text deltas
that never split a character nor show part of a stop string, logprobs, tool calls parsed
from token ids, finish reasons and usage.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sirocco.engine import SamplingParams
from sirocco.engine.outputs import TokenLogprob
from sirocco.tokenizers.base import Tokenizer, ToolCall
from sirocco.tokenizers.mistral import new_tool_call_id


@dataclass(slots=True)
class GenerationJob:
    """Everything the engine and the detokenizer need for one request."""

    request_id: str
    prompt_token_ids: list[int]
    params: list[SamplingParams]  # one per choice
    stop_strings: list[str] = field(default_factory=list)
    tools_enabled: bool = False
    parallel_tool_calls: bool = True  # false: one call at most, the first the model wrote
    logprobs: bool = False
    prompt_logprobs: bool = False
    adapter: str | None = None  # the LoRA adapter of a fine-tuned model


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice gained: text, logprobs, tool calls, and whether it finished.

    `prompt_logprobs` is set on the first delta of a choice whose job asks for them (None
    on every other delta): one `logprob_entry` per prompt token after the first (that
    token has nothing before it, hence no logprob; it is left out rather than sent as
    null, since SDK 3.7's `prompt_logprobs.content` items are not nullable).
    """

    index: int
    content: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Usage:
    """Token counts of a request as the wire reports them, and when its first token came
    (`time.monotonic()`, for the request's log line; not on the wire)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None

    def wire(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def new_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def logprob_entry(tokenizer: Tokenizer, item: TokenLogprob) -> dict[str, Any]:
    """One token's logprobs in the OpenAI shape, with the token ids SDK 3.7 parses."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
            "token_id": token_id,
        }

    entry = one(item.token_id, item.logprob)
    entry["top_logprobs"] = [one(t, lp) for t, lp in item.top]
    return entry


class _ChoiceText:
    """Text bookkeeping of one choice: stop strings, tool-call hold-back, what was sent."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str], tools_enabled: bool,
                 parallel_tool_calls: bool = True):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer()
        self.stop_strings = stop_strings
        self.tools_enabled = tools_enabled
        self.parallel_tool_calls = parallel_tool_calls
        self.sent = 0  # characters of detok.text already emitted
        self.stopped = False  # a stop string was met
        self.in_tool_call = False

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit."""
        self.detok.push(token_ids)
        if self.tools_enabled and not self.in_tool_call:
            start = self.tokenizer.tool_call_start(self.detok.token_ids)
            if start is not None:
                self.in_tool_call = True
                # Content ends where the call begins; send what is left of it.
                content = self.tokenizer.decode(self.detok.token_ids[:start])
                return self._emit_until(len(content), content)
        if self.in_tool_call:
            return ""
        return self._emit_safe(self.detok.text)

    def _emit_until(self, end: int, text: str) -> str:
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _emit_safe(self, text: str) -> str:
        if self.stop_strings:
            window_start = max(0, self.sent - max(len(s) for s in self.stop_strings))
            hits = [text.find(s, window_start) for s in self.stop_strings]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.stopped = True
                return self._emit_until(min(hits), text)
        held = self._held_back(text)
        return self._emit_until(len(text) - held, text)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that could begin a stop string or marker."""
        markers = list(self.stop_strings)
        marker = self.tokenizer.tool_call_marker if self.tools_enabled else None
        if marker:
            markers.append(marker)
        longest = 0
        for m in markers:
            for k in range(min(len(m) - 1, len(text)), longest, -1):
                if text.endswith(m[:k]):
                    longest = k
                    break
        return longest

    def finish(self, cut_off: bool = False) -> tuple[str, list[ToolCall] | None]:
        """At the end: the rest of the content, and the tool calls, if any.

        An output `cut_off` by max_tokens or the context loses its unfinished last call:
        it is neither a call nor content (no half markup ever reaches the client)."""
        if self.stopped:
            return "", None
        self.detok.flush()
        if self.tools_enabled and self.in_tool_call:
            ids = self.detok.token_ids
            parsed = self.tokenizer.parse_output(ids, tools_enabled=True)
            if cut_off:
                before_last = self.tokenizer.parse_output(ids[:self._call_starts()[-1]],
                                                          tools_enabled=True)
                if len(before_last.tool_calls) >= len(parsed.tool_calls):
                    parsed = before_last  # the last call did not parse: it was cut
            if parsed.tool_calls:
                if not self.parallel_tool_calls:
                    del parsed.tool_calls[1:]
                for call in parsed.tool_calls:
                    call.id = call.id if _valid_call_id(call.id) else new_tool_call_id()
                return self._emit_until(len(parsed.content), parsed.content), parsed.tool_calls
            text = parsed.content if cut_off else self.detok.text
            return self._emit_until(len(text), text), None
        text = self.detok.text
        return self._emit_safe(text) if self.stop_strings else self._emit_until(
            len(text), text
        ), None

    def _call_starts(self) -> list[int]:
        """Token index where each tool call of the output begins."""
        ids = self.detok.token_ids
        starts: list[int] = []
        offset = 0
        while (found := self.tokenizer.tool_call_start(ids[offset:])) is not None:
            starts.append(offset + found)
            offset += found + 1
        return starts


def _valid_call_id(call_id: str | None) -> bool:
    return bool(call_id) and len(call_id) == 9 and call_id.isalnum()


async def run_generation(
    engine: Any, tokenizer: Tokenizer, job: GenerationJob, usage: Usage
) -> AsyncIterator[ChoiceDelta]:
    """Run every choice of `job` in the engine; yield deltas as they come, interleaved.

    `usage` is filled in as tokens arrive. Leaving the iteration early aborts every
    choice still running (that is how a disconnected client frees its KV blocks).
    """
    usage.prompt_tokens = len(job.prompt_token_ids)
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()
    streams = []
    for index, params in enumerate(job.params):
        stream = engine.generate(f"{job.request_id}-{index}", job.prompt_token_ids, params,
                                 adapter=job.adapter)
        streams.append(stream)

    async def pump(index: int, stream: AsyncIterator) -> None:
        text = _ChoiceText(tokenizer, job.stop_strings, job.tools_enabled,
                           job.parallel_tool_calls)
        try:
            async for out in stream:
                if index == 0:
                    usage.cached_tokens = out.num_cached_tokens
                for choice in out.outputs:
                    usage.completion_tokens += len(choice.new_token_ids)
                    if usage.first_token_at is None and choice.new_token_ids:
                        usage.first_token_at = time.monotonic()
                    delta = ChoiceDelta(index=index, content=text.push(choice.new_token_ids))
                    if job.logprobs and choice.new_logprobs:
                        delta.logprobs = [
                            logprob_entry(tokenizer, lp) for lp in choice.new_logprobs
                        ]
                    if job.prompt_logprobs and choice.prompt_logprobs is not None:
                        delta.prompt_logprobs = [
                            logprob_entry(tokenizer, lp) for lp in choice.prompt_logprobs
                        ]
                    if text.stopped:
                        delta.finish_reason = "stop"
                        await queue.put(delta)
                        return  # leaving the stream aborts this choice in the engine
                    if choice.finish_reason is not None:
                        # A cut-off answer says so, even when it holds complete calls.
                        cut_off = choice.finish_reason in ("length", "model_length")
                        rest, calls = text.finish(cut_off)
                        delta.content += rest
                        delta.tool_calls = calls
                        delta.finish_reason = (
                            "tool_calls" if calls and not cut_off
                            else _wire_reason(choice.finish_reason)
                        )
                    if (delta.content or delta.logprobs or delta.finish_reason
                            or delta.prompt_logprobs is not None):
                        await queue.put(delta)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        finally:
            await stream.aclose()
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _wire_reason(engine_reason: str) -> str:
    return {"abort": "error"}.get(engine_reason, engine_reason)
