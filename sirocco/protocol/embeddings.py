"""Wire shapes of `POST /v1/embeddings`: Mistral's `EmbeddingRequest` plus OpenAI's names.

Unknown fields are a 422 (`extra_forbidden`), as in the official spec. OpenAI's SDK sends
`dimensions` (the same thing as `output_dimension`) and `user` (an end-user tag that a
self-hosted server has no use for), so both are accepted; token-id inputs (OpenAI's
`list[int]`) are not: a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EmbeddingDtype = Literal["float", "int8", "uint8", "binary", "ubinary"]
EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(BaseModel):
    """What to embed and how the vectors should come back."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="ID of the model to use.", examples=["mistral-embed"])
    input: str | list[str] = Field(
        description="Text to embed, or a non-empty list of texts.",
        examples=[["Embed this sentence.", "As well as this one."]],
    )
    output_dimension: Annotated[int, Field(gt=0)] | None = Field(
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
    dimensions: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="OpenAI's name for output_dimension.")
    user: str | None = Field(default=None, description="OpenAI's end-user tag; not used.")

    @field_validator("input", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        # One clear error instead of one per branch of the union.
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a string or a non-empty list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"input[{i}] must be a string, not {type(item).__name__}")
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
