"""Errors the engine raises at submit time, with the numbers a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's request errors (map them to a 4xx)."""


class RequestTooLong(EngineError):
    """The prompt plus `max_tokens` (or `min_tokens`) can never fit the context length or
    the KV cache; `field` names the request field that asked for too much."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, limit: int,
                 what: str = "the model's context length", field: str = "max_tokens") -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit
        self.field = field
        if max_tokens is None:
            asked = f"{prompt_tokens} prompt tokens leave no room to generate"
        else:
            asked = (f"{prompt_tokens} prompt tokens + {max_tokens} {field} = "
                     f"{prompt_tokens + max_tokens} tokens do not fit")
        super().__init__(f"{asked} in {what} ({limit} tokens)")


class DuplicateRequestId(EngineError):
    """A request id that is already running was submitted again."""
