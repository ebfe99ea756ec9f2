"""One info-level log line per chat, FIM or embeddings request, when it ends.

The line is key=value pairs, easy to grep and to parse::

    request id=req-3f9a1c2b7d4e endpoint=chat model=mistral-tiny status=200
        response_id=cmpl-9d0e... prompt_tokens=12 completion_tokens=30 cached_tokens=0
        ttft=0.081s duration=0.412s finish=stop

It never holds the prompt, the output or a key: only counts, times and reasons.
`status` is the HTTP status answered (499: the client left before the answer ended);
`response_id` is the `id` of the body the client got, when there is one.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sirocco.requests")


def request_id_of(request: Any) -> str:
    """The id the HTTP layer gave a request (`request.state.request_id`), else a new
    short one."""
    return getattr(request.state, "request_id", None) or "req-" + uuid.uuid4().hex[:12]


@dataclass(slots=True)
class RequestRecord:
    """What the log line of one request says, filled in as the request runs."""

    request_id: str
    endpoint: str  # chat, fim or embeddings
    model: str
    started: float = field(default_factory=time.monotonic)
    status: int = 200
    response_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token: float | None = None  # time.monotonic() of the first generated token
    finish: dict[int, str] = field(default_factory=dict)  # choice index -> reason
    logged: bool = False

    def count(self, prompt_tokens: int, completion_tokens: int = 0, cached_tokens: int = 0,
              first_token: float | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens
        self.first_token = first_token

    def done(self, status: int | None = None) -> None:
        """Write the line (once; later calls do nothing)."""
        if self.logged:
            return
        self.logged = True
        if status is not None:
            self.status = status
        now = time.monotonic()
        ttft = "-" if self.first_token is None else f"{self.first_token - self.started:.3f}s"
        finish = ",".join(self.finish[i] for i in sorted(self.finish)) or "-"
        log.info(
            "request id=%s endpoint=%s model=%s status=%d response_id=%s prompt_tokens=%d "
            "completion_tokens=%d cached_tokens=%d ttft=%s duration=%.3fs finish=%s",
            self.request_id, self.endpoint, self.model, self.status, self.response_id or "-",
            self.prompt_tokens,
            self.completion_tokens, self.cached_tokens, ttft, now - self.started, finish,
        )
