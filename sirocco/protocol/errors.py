"""Error bodies in the shapes the Mistral API uses (reference/mistral-api.md section 2)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    """`{"object":"error","message":...,"type":...,"param":...,"code":...}`"""

    object: str = "error"
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class HTTPValidationError(BaseModel):
    """422: `{"detail":[{"loc","msg","type"}]}`, the only error body the spec defines."""

    detail: list[ValidationErrorItem]


class Unauthorized(BaseModel):
    detail: str = "Unauthorized"
