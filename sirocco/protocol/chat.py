"""Wire shapes of chat and FIM completions: the Mistral spec plus the AI/ML API dialect.

Requests forbid unknown fields (422 `extra_forbidden`), as the official spec does.
Fields of both dialects are accepted on the same endpoint: Mistral's `random_seed` and
OpenAI's `seed`, `max_tokens` and `max_completion_tokens`, and the sampling extras of the
AI/ML API seed (`top_k`, `min_p`, `top_a`, `repetition_penalty`, `logit_bias`, ...).
Ranges here are the union of both dialects (temperature up to 2, as the AI/ML API
allows); checks that need the model (vocabulary, context length) live in the service.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from sirocco.protocol.limits import (
    CHAT_MAX_CONTENT_CHUNKS,
    CHAT_MAX_MESSAGES,
    LOGIT_BIAS_MAX_ENTRIES,
    PROMPT_MAX_CHARS,
    STOP_MAX_CHARS,
    STOP_MAX_COUNT,
    TOOLS_MAX,
    Count,
    Int64,
    LogitBias,
    PositiveCount,
    PromptText,
    Seed,
    StopList,
    StopString,
    check_schema,
    reject_lone_surrogates,
)


class Strict(BaseModel):
    # allow_inf_nan: Python's JSON parser reads NaN and Infinity; no field takes them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- content chunks -------------------------------------------------------------------


class TextChunk(Strict):
    type: Literal["text"] = "text"
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["low", "auto", "high"] | None = None


class ImageURLChunk(Strict):
    type: Literal["image_url"] = "image_url"
    image_url: str | ImageURL


class DocumentURLChunk(Strict):
    type: Literal["document_url"] = "document_url"
    document_url: str
    document_name: str | None = None


class ReferenceChunk(Strict):
    type: Literal["reference"] = "reference"
    reference_ids: list[Int64 | str]


class FileChunk(Strict):
    type: Literal["file"] = "file"
    file_id: str


class ThinkChunk(Strict):
    type: Literal["thinking"] = "thinking"
    thinking: list[TextChunk | ReferenceChunk]
    signature: str | None = None
    closed: bool = True


class InputAudioChunk(Strict):
    type: Literal["input_audio"] = "input_audio"
    input_audio: str


ContentChunk = Annotated[
    TextChunk
    | ImageURLChunk
    | DocumentURLChunk
    | ReferenceChunk
    | FileChunk
    | ThinkChunk
    | InputAudioChunk,
    Field(discriminator="type"),
]
Content = str | list[ContentChunk]


# -- tools ----------------------------------------------------------------------------


class FunctionCall(Strict):
    name: str
    arguments: dict[str, Any] | str


class ToolCall(Strict):
    id: str = "null"
    type: Literal["function"] = "function"
    function: FunctionCall
    index: Count = 0


class Function(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    strict: bool = False
    parameters: dict[str, Any] | None = None
    required: list[str] | None = None  # the AI/ML API's example sends this beside parameters

    @field_validator("parameters")
    @classmethod
    def _bounded_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_schema(value)
        return value


class Tool(Strict):
    type: Literal["function"] = "function"
    function: Function


class FunctionName(Strict):
    name: str


class ToolChoice(Strict):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoiceEnum = Literal["auto", "none", "any", "required"]


# -- messages -------------------------------------------------------------------------


class SystemMessage(Strict):
    role: Literal["system"] = "system"
    content: str | list[TextChunk | ThinkChunk]
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"] = "user"
    content: Content | None
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"] = "assistant"
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    prefix: bool = False
    name: str | None = None


class ToolMessage(Strict):
    role: Literal["tool"] = "tool"
    content: Content | None
    tool_call_id: str | None = None
    name: str | None = None


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


def text_chars(message: Message) -> int:
    """Characters of text in `message` that the tokenizer reads: its content strings, text
    and thinking chunks, and tool-call arguments sent as strings."""
    chars = 0
    content = message.content
    if isinstance(content, str):
        chars += len(content)
    for chunk in content if isinstance(content, list) else ():
        if isinstance(chunk, TextChunk):
            chars += len(chunk.text)
        elif isinstance(chunk, ThinkChunk):
            chars += sum(len(c.text) for c in chunk.thinking if isinstance(c, TextChunk))
    for call in getattr(message, "tool_calls", None) or ():
        if isinstance(call.function.arguments, str):
            chars += len(call.function.arguments)
    return chars


# -- request options ------------------------------------------------------------------


class JsonSchema(Strict):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("schema_")
    @classmethod
    def _bounded_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema(value)
        return value


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class Prediction(Strict):
    type: Literal["content"] = "content"
    content: str = ""


class StreamOptions(Strict):
    include_usage: bool = False


class GuardrailConfig(BaseModel):
    """Accepted in shape only: requests carrying guardrails are refused (no moderation)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    block_on_error: bool = False


Penalty = Annotated[float, Field(ge=-2, le=2)]


def _too_long(title: str, loc: tuple[str, ...], value: list | dict, cap: int) -> ValidationError:
    """pydantic's own `too_long` error, raised before the items are validated."""
    error = PydanticCustomError(
        "too_long", "{kind} should have at most {max_length} items, not {actual_length}",
        {"kind": "List" if isinstance(value, list) else "Dictionary", "max_length": cap,
         "actual_length": len(value)})
    return ValidationError.from_exception_data(title, [InitErrorDetails(
        type=error, loc=loc, input=value)])


class SamplingFields(Strict):
    """Generation fields shared by chat and FIM."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: PositiveCount | None = None
    min_tokens: Count | None = None
    stream: bool = False
    stop: StopString | StopList | None = Field(
        None, description=f"at most {STOP_MAX_COUNT} strings of {STOP_MAX_CHARS} characters")
    random_seed: Seed | None = None
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None

    #: Lists and maps whose length is checked before anything walks the body: 100,000
    #: stop strings or logit_bias entries are refused at once, not after looking at each.
    LIST_CAPS: ClassVar[tuple[tuple[str, int], ...]] = (("stop", STOP_MAX_COUNT),)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        for field, cap in cls.LIST_CAPS if isinstance(data, dict) else ():
            value = data.get(field)
            if isinstance(value, (list, dict)) and len(value) > cap:
                raise _too_long(cls.__name__, (field,), value, cap)
        return reject_lone_surrogates(data, cls.__name__)

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingFields:
        if (
            self.min_tokens is not None
            and self.max_tokens is not None
            and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`, both dialects."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=CHAT_MAX_MESSAGES)] = (
        Field(description=f"at most {CHAT_MAX_MESSAGES} messages holding at most "
                          f"{PROMPT_MAX_CHARS} characters of text in all"))
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=TOOLS_MAX)] | None = None
    tool_choice: ToolChoiceEnum | ToolChoice = "auto"
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: PositiveCount | None = None
    prediction: Prediction | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    prompt_mode: Literal["reasoning"] | None = None
    guardrails: list[GuardrailConfig] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    safe_prompt: bool = False
    # SDK 3.7 and the AI/ML API dialect:
    top_k: Count | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_a: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    logit_bias: LogitBias | None = Field(
        None, description=f"at most {LOGIT_BIAS_MAX_ENTRIES} token ids, each biased by -100..100")
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    prompt_logprobs: bool | None = None
    top_prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: PositiveCount | None = None
    seed: Int64 | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    LIST_CAPS = (("messages", CHAT_MAX_MESSAGES), ("tools", TOOLS_MAX),
                 ("stop", STOP_MAX_COUNT), ("logit_bias", LOGIT_BIAS_MAX_ENTRIES))

    @model_validator(mode="before")
    @classmethod
    def _bounded_chunks(cls, data: Any) -> Any:
        # (runs first: past CHAT_MAX_MESSAGES, the messages are left to LIST_CAPS)
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or len(messages) > CHAT_MAX_MESSAGES:
            return data
        chunks = 0
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            chunks += len(content) if isinstance(content, list) else 0
            if chunks > CHAT_MAX_CONTENT_CHUNKS:
                raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                    type=PydanticCustomError(
                        "too_long", "the messages hold more than {limit} content chunks in "
                        "all (passed at this message)", {"limit": CHAT_MAX_CONTENT_CHUNKS}),
                    loc=("messages", i), input=f"{chunks} chunks")])
        return data

    @model_validator(mode="after")
    def _bounded_text(self) -> ChatCompletionRequest:
        total = 0
        for i, message in enumerate(self.messages):
            total += text_chars(message)
            if total > PROMPT_MAX_CHARS:
                error = PydanticCustomError(
                    "too_long", "the messages hold more than {limit} characters of text in "
                    "all (passed at this message)", {"limit": PROMPT_MAX_CHARS})
                raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                    type=error, loc=("messages", i), input=f"{total} characters")])
        return self


class FIMCompletionRequest(SamplingFields):
    """`POST /v1/fim/completions`: code before (`prompt`) and after (`suffix`) the cursor."""

    prompt: PromptText = Field(description=f"at most {PROMPT_MAX_CHARS} characters")
    suffix: PromptText | None = Field("", description=f"at most {PROMPT_MAX_CHARS} characters")


# -- responses ------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int = 0


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None
    prefix: bool = False


FinishReason = Literal["stop", "length", "model_length", "error", "tool_calls"]


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None
    # with prompt_logprobs: one entry per prompt token after the first
    prompt_logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
