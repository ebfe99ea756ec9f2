"""`POST /v1/chat/completions` and `POST /v1/fim/completions`: JSON or an SSE stream.

The stream follows mistral-api.md 3.6: a first delta `{"role":"assistant","content":""}`,
content deltas with `"finish_reason": null` written out, a last chunk per choice with its
finish_reason (and usage on the very last), then `data: [DONE]`. Tool calls arrive whole
in one delta. A client that goes away aborts its generation, streamed or not: while a
non-streamed answer is collected (or a stream waits for its first token) the ASGI receive
channel is watched for `http.disconnect`, and the engine requests are aborted when it comes.

`prompt_logprobs: true` adds to each choice `"prompt_logprobs": {"content": [...]}`, shaped
like `logprobs` (token, logprob, bytes, token_id, top_logprobs with `top_prompt_logprobs`
alternatives): one entry per prompt token after the first, in prompt order (the first
token has nothing before it; it is left out, not sent as null). When streaming it rides
on the first chunk of each choice, the `{"role":"assistant","content":""}` one, which is
then sent once the choice's first token is known rather than before generation starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sirocco.api.errors import APIError
from sirocco.api.state import ServerState, get_state
from sirocco.engine import (
    EngineDeadError,
    EngineError,
    EngineOverloaded,
    RequestFailed,
    RequestTimedOut,
    UnknownAdapter,
)
from sirocco.protocol.chat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    FIMCompletionRequest,
)
from sirocco.serving.completions import prepare_chat_off_loop, prepare_fim_off_loop
from sirocco.serving.generation import ChoiceDelta, GenerationJob, Usage, run_generation
from sirocco.serving.registry import ServedModel
from sirocco.serving.request_log import RequestRecord, request_id_of

router = APIRouter(tags=["completions"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Chat completion",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    request: ChatCompletionRequest, raw: Request, state: ServerState = Depends(get_state)
) -> Any:
    record = RequestRecord(request_id_of(raw), "chat", request.model)
    served, job = await prepare_chat_off_loop(request, state.registry, state.settings.max_n)
    # Mistral sends usage on the last chunk; OpenAI's stream_options.include_usage asks
    # for a final chunk with no choices that carries it (and false for none at all).
    usage_mode = "last"
    if request.stream_options is not None:
        usage_mode = "separate" if request.stream_options.include_usage else "none"
    return await _answer(raw, served, job, request.model, request.stream, usage_mode, record)


@router.post(
    "/v1/fim/completions",
    response_model=ChatCompletionResponse,
    summary="Fill-in-the-middle completion",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def fim_completions(
    request: FIMCompletionRequest, raw: Request, state: ServerState = Depends(get_state)
) -> Any:
    record = RequestRecord(request_id_of(raw), "fim", request.model)
    served, job = await prepare_fim_off_loop(request, state.registry)
    return await _answer(raw, served, job, request.model, request.stream, "last", record)


#: What `_unless_disconnected` returns when the client went away first.
_GONE = object()
#: The status logged (never seen: nobody is listening) for a request whose client left,
#: as nginx logs it.
CLIENT_CLOSED = 499


async def _answer(
    raw: Request, served: ServedModel, job: GenerationJob, model: str, stream: bool,
    usage_mode: str, record: RequestRecord,
) -> Any:
    usage = Usage()
    record.response_id = job.request_id
    status, streaming = 500, False  # (500 unless it ends otherwise: an unexpected error)
    try:
        served.engine.check_admission(len(job.params))
        deltas = run_generation(served.engine, served.tokenizer, job, usage)
        if stream:
            # engine errors (too long, ...) surface with the first delta, as a 4xx
            first = await _unless_disconnected(raw, anext(deltas, None))
            if first is _GONE:
                status = CLIENT_CLOSED
                return Response(status_code=status)
            streaming = True  # the stream's end writes the log line
            return StreamingResponse(
                _sse(job, model, first, deltas, usage, usage_mode, record),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        body = await _unless_disconnected(raw, _collect(job, model, deltas, usage))
        if body is _GONE:
            status = CLIENT_CLOSED
            return Response(status_code=status)
        record.finish = {c["index"]: c["finish_reason"] for c in body["choices"]}
        response = await asyncio.to_thread(JSONResponse, body)  # (logprobs: big bodies)
        status = 200
        return response
    except (EngineError, RequestFailed, EngineDeadError) as exc:
        response = _engine_error(exc, model)
        status = response.status_code
        return response
    finally:
        if not streaming:
            _log_usage(record, usage)
            record.done(status)


def _log_usage(record: RequestRecord, usage: Usage) -> None:
    record.count(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                 usage.first_token_at)


async def _unless_disconnected(request: Request, awaitable: Any) -> Any:
    """The result of `awaitable`, or `_GONE` (with it cancelled) if the client leaves first.

    Cancelling the collection closes `run_generation`, which aborts the engine requests:
    their KV blocks are freed before the next step.
    """
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this handler itself is cancelled: stop both
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return _GONE
    return work.result()


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone away. The body is read by now, so the next ASGI
    message is `http.disconnect` (or, for an unread body, more of it: skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(exc: Exception, model: str) -> JSONResponse:
    """An engine failure as the contract's error body (429 with Retry-After when full)."""
    headers = None
    if isinstance(exc, EngineOverloaded):
        error = APIError(429, str(exc), type="rate_limit_error", code="overloaded")
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, UnknownAdapter):
        error = APIError(400, f"Invalid model: {model}", type="invalid_model", param="model",
                         code="1500")
    elif isinstance(exc, RequestTimedOut):
        error = APIError(504, str(exc), type="timeout_error", code="request_timeout")
    elif isinstance(exc, RequestFailed):
        error = APIError(500, str(exc), type="internal_error")
    elif isinstance(exc, EngineDeadError):
        error = APIError(503, f"model {model!r} is not available: {exc}", type="internal_error")
    else:
        error = APIError(400, str(exc))
    return JSONResponse(status_code=error.status_code, content=error.body(), headers=headers)


async def _collect(
    job: GenerationJob,
    model: str,
    deltas: AsyncIterator[ChoiceDelta],
    usage: Usage,
) -> dict[str, Any]:
    n = len(job.params)
    content = [""] * n
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    prompt_logprobs: list[list[dict]] = [[] for _ in range(n)]
    calls: list[Any] = [None] * n
    finish: list[str] = ["error"] * n
    async for delta in deltas:
        content[delta.index] += delta.content
        logprobs[delta.index].extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            prompt_logprobs[delta.index] = delta.prompt_logprobs
        if delta.tool_calls:
            calls[delta.index] = delta.tool_calls
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    choices = []
    for i in range(n):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content[i],
            "tool_calls": _wire_calls(calls[i]),
            "prefix": False,
        }
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish[i]}
        if job.logprobs:
            choice["logprobs"] = {"content": logprobs[i]}
        if job.prompt_logprobs:
            choice["prompt_logprobs"] = {"content": prompt_logprobs[i]}
        choices.append(choice)
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage.wire(),
    }


async def _chain(first: list[ChoiceDelta], rest: AsyncIterator[ChoiceDelta]):
    for item in first:
        yield item
    async for item in rest:
        yield item


def _wire_calls(calls: list[Any] | None) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    return [
        {
            "id": c.id,
            "type": "function",
            "index": i,
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for i, c in enumerate(calls)
    ]


async def _sse(
    job: GenerationJob,
    model: str,
    first: ChoiceDelta | None,
    deltas: AsyncIterator[ChoiceDelta],
    usage: Usage,
    usage_mode: str,
    record: RequestRecord,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    n = len(job.params)
    open_choices = n

    def chunk(choices: list[dict[str, Any]], usage_body: dict | None = None) -> bytes:
        body = {
            "id": job.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage_body is not None:  # the spec has the key absent, not null, elsewhere
            body["usage"] = usage_body
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def opening(i: int, prompt_logprobs: list[dict] | None = None) -> bytes:
        choice: dict[str, Any] = {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
        }
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = {"content": prompt_logprobs}
        return chunk([choice])

    opened: set[int] = set()
    complete = False  # (not once the client has left mid-stream)
    try:
        if not job.prompt_logprobs:  # else each choice opens with its first delta
            for i in range(n):
                yield opening(i)
            opened.update(range(n))
        finished: set[int] = set()
        try:
            async for delta in _chain([first] if first else [], deltas):
                if delta.index not in opened:
                    opened.add(delta.index)
                    yield opening(delta.index, delta.prompt_logprobs)
                body: dict[str, Any] = {}
                if delta.content:
                    body["content"] = delta.content
                if delta.tool_calls:
                    body["tool_calls"] = _wire_calls(delta.tool_calls)
                choice: dict[str, Any] = {
                    "index": delta.index,
                    "delta": body,
                    "finish_reason": delta.finish_reason,
                }
                if job.logprobs and delta.logprobs:
                    choice["logprobs"] = {"content": delta.logprobs}
                last = False
                if delta.finish_reason:
                    record.finish[delta.index] = delta.finish_reason
                    finished.add(delta.index)
                    open_choices -= 1
                    last = open_choices == 0
                yield chunk([choice], usage.wire() if last and usage_mode == "last" else None)
        except (RequestFailed, EngineDeadError) as exc:
            # The contract has no error event: every open choice ends with finish_reason
            # "error", and an SSE comment (which clients skip) says why.
            for i in sorted(set(range(n)) - finished):
                record.finish[i] = "error"
                open_choices -= 1
                last = open_choices == 0
                yield chunk([{"index": i, "delta": {}, "finish_reason": "error"}],
                            usage.wire() if last and usage_mode == "last" else None)
            yield b": error " + json.dumps({"message": str(exc)}).encode() + b"\n\n"
        if usage_mode == "separate":
            yield chunk([], usage.wire())
        yield b"data: [DONE]\n\n"
        complete = True
    finally:
        await deltas.aclose()
        _log_usage(record, usage)
        record.done(200 if complete else CLIENT_CLOSED)
