"""Chat and FIM requests -> prompt token ids + sampling params (a `GenerationJob`).

This is where the service decides: which model, how the conversation is encoded, which
fields map to which engine parameter, and which requests are refused with a 4xx. It
knows the wire models but not HTTP; errors are `APIError`s the router answers as-is.

The work is CPU-bound (chat templates, tokenizing, grammar compilation: seconds for a
huge request), so routers call `prepare_chat_off_loop` / `prepare_fim_off_loop`: the
work runs in a worker thread, one request at a time per tokenizer (Hugging Face
tokenizers flip state on each encode and must not be called from two threads at once),
and the waiting is done on the event loop, so no worker thread sits blocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sirocco.api.errors import APIError, bad_request, invalid_model
from sirocco.engine import EngineError, SamplingParams
from sirocco.protocol.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    FIMCompletionRequest,
    SamplingFields,
    SystemMessage,
    TextChunk,
    ToolChoice,
    ToolMessage,
)
from sirocco.serving.generation import GenerationJob, new_completion_id
from sirocco.serving.registry import ModelRegistry, ServedModel, UnknownModel
from sirocco.structured import (
    ConstraintFactory,
    GrammarConstraintFactory,
    InvalidSchema,
    json_object,
    json_schema,
    no_tool_calls,
    tool_call,
)
from sirocco.tokenizers.base import FIMNotSupported, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

#: Mistral's documented guardrail system prompt, prepended when `safe_prompt` is true.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote "
    "fairness and positivity."
)
DEFAULT_TEMPERATURE = 0.7


T = TypeVar("T")

_encoding_locks: weakref.WeakKeyDictionary[Tokenizer, asyncio.Lock] = (
    weakref.WeakKeyDictionary())


async def _off_loop(tokenizer: Tokenizer, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread, while no other request uses `tokenizer`."""
    lock = _encoding_locks.get(tokenizer)
    if lock is None:
        lock = _encoding_locks[tokenizer] = asyncio.Lock()
    async with lock:
        return await asyncio.to_thread(fn, *args)


async def prepare_chat_off_loop(request: ChatCompletionRequest, registry: ModelRegistry,
                                max_n: int) -> tuple[ServedModel, GenerationJob]:
    """`prepare_chat`, run off the event loop."""
    served = resolve_generative(registry, request.model)
    return await _off_loop(served.tokenizer, prepare_chat, request, registry, max_n)


async def prepare_fim_off_loop(request: FIMCompletionRequest, registry: ModelRegistry
                               ) -> tuple[ServedModel, GenerationJob]:
    """`prepare_fim`, run off the event loop."""
    served = resolve_generative(registry, request.model)
    return await _off_loop(served.tokenizer, prepare_fim, request, registry)


def resolve_generative(registry: ModelRegistry, name: str) -> ServedModel:
    try:
        served = registry.get(name)
    except UnknownModel:
        raise invalid_model(name) from None
    if served.kind != "generate" or served.engine is None:
        raise bad_request(
            f"model {name!r} cannot generate text (it is an embedding model)", "model"
        )
    return served


# -- messages -------------------------------------------------------------------------


def _text_of(content: Any, where: str, model: str) -> str | None:
    """Flatten content chunks to text; refuse chunk types a text-only model cannot take."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for i, chunk in enumerate(content):
        if isinstance(chunk, TextChunk):
            parts.append(chunk.text)
        elif chunk.type == "thinking":
            parts.extend(c.text for c in chunk.thinking if isinstance(c, TextChunk))
        else:
            raise bad_request(
                f"{where}.content[{i}] is a {chunk.type!r} chunk, but model {model!r} takes "
                "text only",
                "messages",
            )
    return "".join(parts)


def wire_messages(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], bool]:
    """The conversation as plain dicts for the tokenizer, normalised; and whether the
    last message is an assistant prefix to continue.

    Harmless shapes strict validation would refuse are normalised: system messages are
    gathered at the front (in order), consecutive user messages are merged by the
    tokenizer. Truly invalid ones get a 400 naming the message.
    """
    model = request.model
    system: list[str] = [SAFE_PROMPT] if request.safe_prompt else []
    rest: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    continue_final = False
    last = len(request.messages) - 1
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if isinstance(message, SystemMessage):
            system.append(_text_of(message.content, where, model) or "")
            continue
        item: dict[str, Any] = {
            "role": message.role,
            "content": _text_of(message.content, where, model),
        }
        if isinstance(message, AssistantMessage):
            if message.prefix:
                if i != last:
                    raise bad_request(
                        f"{where}: only the last message may have prefix: true", "messages"
                    )
                continue_final = True
            if message.tool_calls:
                item["tool_calls"] = [
                    _wire_call(c, f"{where}.tool_calls[{j}]")
                    for j, c in enumerate(message.tool_calls)
                ]
                call_ids.update(c["id"] for c in item["tool_calls"])
            if item["content"] is None and not message.tool_calls:
                raise bad_request(
                    f"{where}: an assistant message needs content or tool_calls", "messages"
                )
            if item["content"] is None:
                del item["content"]
        elif isinstance(message, ToolMessage):
            if message.tool_call_id not in call_ids:
                raise bad_request(
                    f"{where}: tool result for tool_call_id {message.tool_call_id!r} answers "
                    "no tool call of an earlier assistant message",
                    "messages",
                )
            item["tool_call_id"] = message.tool_call_id
            if message.name:
                item["name"] = message.name
            item["content"] = item["content"] or ""
        elif item["content"] is None:
            item["content"] = ""
        rest.append(item)
    if rest and rest[-1]["role"] == "assistant" and not continue_final:
        raise bad_request(
            "the conversation ends with an assistant message; add a user message, or set "
            "prefix: true on it to have the model continue it",
            "messages",
        )
    if not rest:
        raise bad_request("messages hold only system messages; add a user message", "messages")
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + rest, continue_final


def _wire_call(call: Any, where: str) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            raise bad_request(f"{where}.function.arguments is not valid JSON", "messages") from None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def wire_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not request.tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": t.function.name,
                "description": t.function.description,
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in request.tools
    ]


# -- sampling -------------------------------------------------------------------------


def _base_params(request: SamplingFields, served: ServedModel, prompt_len: int,
                 prompt_field: str = "messages") -> dict:
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    limit = served.max_context_length
    if prompt_len >= limit:
        raise bad_request(
            f"the prompt is {prompt_len} tokens, but model {served.id!r} has a "
            f"context length of {limit} tokens",
            prompt_field,
        )
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise bad_request(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_len + max_tokens} tokens exceeds the context length of model "
            f"{served.id!r} ({limit} tokens)",
            "max_tokens",
        )
    temperature = request.temperature
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    return dict(
        temperature=temperature,
        top_p=request.top_p if request.top_p is not None else 1.0,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens or 0,
        stop_token_ids=list(served.tokenizer.eos_token_ids),
    )


def _seeds(seed: int | None, n: int) -> list[int | None]:
    return [None if seed is None else seed + i for i in range(n)]


def _constraint(request: ChatCompletionRequest, served: ServedModel,
                tools: list[dict[str, Any]] | None) -> ConstraintFactory | None:
    """The grammar a request's output must follow, if any (InvalidSchema -> 400)."""
    tokenizer = served.tokenizer
    choice = request.tool_choice
    fmt = request.response_format
    try:
        if isinstance(choice, ToolChoice) or choice in ("any", "required"):
            if not tools:
                raise bad_request("tool_choice asks for a tool call, but the request has no "
                                  "tools", "tool_choice")
            name = choice.function.name if isinstance(choice, ToolChoice) else choice
            if isinstance(choice, ToolChoice) and name not in {t["function"]["name"]
                                                               for t in tools}:
                raise bad_request(f"tool_choice names {name!r}, which is not among the tools",
                                  "tool_choice")
            return tool_call(tools, name, request.parallel_tool_calls, tokenizer)
        if fmt is not None and fmt.type == "json_object":
            return json_object(tokenizer)
        if fmt is not None and fmt.type == "json_schema":
            return json_schema(fmt.json_schema.schema_, fmt.json_schema.strict, tokenizer)
        if tools and choice == "none":
            return no_tool_calls(tokenizer)
    except InvalidSchema as exc:
        param = "response_format" if fmt is not None and fmt.type != "text" else "tools"
        raise bad_request(str(exc), param) from None
    return None


def prepare_chat(request: ChatCompletionRequest, registry: ModelRegistry,
                 max_n: int) -> tuple[ServedModel, GenerationJob]:
    """Validate a chat request against its model and build the generation job."""
    if request.guardrails:
        raise bad_request("guardrails (moderation) are not supported by this server; "
                          "send the request without them", "guardrails")
    served = resolve_generative(registry, request.model)
    tokenizer = served.tokenizer
    n = request.n or 1
    if n > max_n:
        raise APIError(422, f"n is {n}, above this server's maximum of {max_n}", param="n")
    tools = wire_tools(request)
    if tools and not tokenizer.supports_tools:
        raise bad_request(f"model {served.id!r} does not support tools", "tools")
    constraint = _constraint(request, served, tools)
    if constraint is not None and isinstance(constraint, GrammarConstraintFactory) \
            and request.min_tokens:
        raise bad_request("min_tokens cannot be combined with structured output or a forced "
                          "tool call: the grammar decides where the output ends", "min_tokens")
    messages, continue_final = wire_messages(request)
    try:
        prompt = tokenizer.encode_chat(messages, tools, continue_final=continue_final)
    except TokenizerError as exc:
        raise bad_request(f"invalid conversation: {exc}", "messages") from None
    base = _base_params(request, served, len(prompt))
    logit_bias = _logit_bias(request.logit_bias, tokenizer.vocab_size)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if request.top_prompt_logprobs is not None and not request.prompt_logprobs:
        raise bad_request("top_prompt_logprobs needs prompt_logprobs: true",
                          "top_prompt_logprobs")
    seed = request.random_seed if request.random_seed is not None else request.seed
    params = [
        SamplingParams(
            **base,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            top_a=request.top_a or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=logit_bias or None,
            seed=s,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            prompt_logprobs=((request.top_prompt_logprobs or 0) if request.prompt_logprobs
                             else None),
            # one processor per choice: each keeps its own grammar state
            logits_processors=[constraint()] if constraint is not None else [],
        )
        for s in _seeds(seed, n)
    ]
    job = GenerationJob(
        request_id=new_completion_id(),
        prompt_token_ids=prompt,
        params=params,
        stop_strings=request.stop_strings(),
        tools_enabled=bool(tools) and request.tool_choice != "none",
        parallel_tool_calls=request.parallel_tool_calls,
        logprobs=bool(request.logprobs),
        prompt_logprobs=bool(request.prompt_logprobs),
        adapter=served.id if served.fine_tuned else None,
    )
    _validate_in_engine(served, job)
    return served, job


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})",
                "logit_bias",
            )
        out[token_id] = value
    return out


def prepare_fim(
    request: FIMCompletionRequest, registry: ModelRegistry
) -> tuple[ServedModel, GenerationJob]:
    """Validate a FIM request and encode it with the model's FIM tokens (suffix first)."""
    served = resolve_generative(registry, request.model)
    try:
        prompt = served.tokenizer.encode_fim(request.prompt, request.suffix or "")
    except FIMNotSupported as exc:
        raise bad_request(
            f"model {served.id!r} cannot do fill-in-the-middle: {exc}", "model"
        ) from None
    except TokenizerError as exc:
        raise bad_request(str(exc), "prompt") from None
    base = _base_params(request, served, len(prompt), "prompt")
    params = [SamplingParams(**base, seed=request.random_seed)]
    job = GenerationJob(new_completion_id(), prompt, params, request.stop_strings(),
                        adapter=served.id if served.fine_tuned else None)
    _validate_in_engine(served, job)
    return served, job


def _validate_in_engine(served: ServedModel, job: GenerationJob) -> None:
    """What only the engine knows (KV cache size, vocabulary): a 400 before any stream."""
    try:
        for params in job.params:
            served.engine.validate(job.prompt_token_ids, params)
    except (EngineError, ValueError) as exc:
        raise bad_request(str(exc)) from None
