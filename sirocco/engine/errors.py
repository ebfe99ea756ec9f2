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


class UnknownAdapter(EngineError):
    """The LoRA adapter a request names is not loaded (its model was deleted meanwhile)."""


class EngineOverloaded(EngineError):
    """Admission is full: running and waiting requests are at their bounds (answer 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(Exception):
    """The engine could not run this request (a step raised for it); others go on.
    Not an `EngineError`: it is the server's failure, not the client's."""


class RequestTimedOut(RequestFailed):
    """The request ran past its deadline (`--request-timeout`); its blocks were freed."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request did not finish within the server's request timeout "
                         f"of {timeout:g} s")
        self.timeout = timeout
