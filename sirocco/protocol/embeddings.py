"""Wire shapes of `POST /v1/embeddings`: Mistral's `EmbeddingRequest` plus OpenAI's names.

Unknown fields are a 422 (`extra_forbidden`), as in the official spec. OpenAI's SDK sends
`dimensions` (the same thing as `output_dimension`) and `user` (an end-user tag that a
self-hosted server has no use for), so both are accepted; token-id inputs (OpenAI's
`list[int]`) are not: a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sirocco.protocol.limits import (
    COUNT_MAX,
    EMBEDDING_INPUT_MAX_CHARS,
    EMBEDDING_MAX_INPUTS,
    EMBEDDING_MAX_TOTAL_CHARS,
    reject_lone_surrogates,
)

EmbeddingDtype = Literal["float", "int8", "uint8", "binary", "ubinary"]
EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(BaseModel):
    """What to embed and how the vectors should come back."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="ID of the model to use.", examples=["mistral-embed"])
    input: str | list[str] = Field(
        description=f"Text to embed, or a non-empty list of at most {EMBEDDING_MAX_INPUTS} "
                    f"texts of at most {EMBEDDING_INPUT_MAX_CHARS} characters each and "
                    f"{EMBEDDING_MAX_TOTAL_CHARS} in all.",
        examples=[["Embed this sentence.", "As well as this one."]],
    )
    output_dimension: Annotated[int, Field(gt=0, le=COUNT_MAX)] | None = Field(
        default=None,
        description="Keep the first n dimensions (re-normalised); default: the model's size.",
    )
    output_dtype: EmbeddingDtype = Field(
        default="float", description="float, int8, uint8, or bit-packed binary / ubinary.")
    encoding_format: EncodingFormat = Field(
        default="float",
        description="float: a JSON array; base64: the vector's bytes (little-endian float32 "
                    "for float, one byte per value for the integer dtypes).")
    metadata: dict[str, Any] | None = None
    dimensions: Annotated[int, Field(gt=0, le=COUNT_MAX)] | None = Field(
        default=None, description="OpenAI's name for output_dimension.")
    user: str | None = Field(default=None, description="OpenAI's end-user tag; not used.")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return reject_lone_surrogates(data, cls.__name__)

    @field_validator("input", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        # One clear error instead of one per branch of the union.
        if isinstance(value, str):
            _check_length(value, "input")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a string or a non-empty list of strings")
        if len(value) > EMBEDDING_MAX_INPUTS:
            raise ValueError(f"input holds {len(value)} texts, above the limit of "
                             f"{EMBEDDING_MAX_INPUTS} per request; send them in batches")
        total = 0
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"input[{i}] must be a string, not {type(item).__name__}")
            _check_length(item, f"input[{i}]")
            total += len(item)
        if total > EMBEDDING_MAX_TOTAL_CHARS:
            raise ValueError(f"input holds {total} characters in all, above the limit of "
                             f"{EMBEDDING_MAX_TOTAL_CHARS} per request; send smaller batches")
        return value

    @model_validator(mode="after")
    def _one_dimension(self) -> EmbeddingRequest:
        if self.dimensions is not None:
            if self.output_dimension is not None and self.output_dimension != self.dimensions:
                raise ValueError("output_dimension and dimensions disagree; send one of them")
            self.output_dimension = self.dimensions
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _check_length(text: str, where: str) -> None:
    if len(text) > EMBEDDING_INPUT_MAX_CHARS:
        raise ValueError(f"{where} is {len(text)} characters long, above the limit of "
                         f"{EMBEDDING_INPUT_MAX_CHARS} per input")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[int] | str
    index: int


class EmbeddingResponse(BaseModel):
    """`{"id","object":"list","model","usage","data":[...]}`; the SDK needs every key."""

    id: str
    object: Literal["list"] = "list"
    model: str
    usage: UsageInfo
    data: list[EmbeddingData]
