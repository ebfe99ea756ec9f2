"""What a request must pass before any route sees it: the API key, the body size limit,
the read timeout, the bound on concurrent uploads and, for a JSON body, the bound on its
items (`JSON_MAX_ITEMS`), checked before it is parsed.

A pure ASGI middleware, because FastAPI reads and parses a body before a route's
dependencies run: a refused request must cost its headers, not its body. Refusing a
request that carries a body closes the connection (`Connection: close`), so the rest of
the body is never read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sirocco.api.auth import authorization_ok
from sirocco.api.errors import APIError
from sirocco.api.files import ENVELOPE_ALLOWANCE, upload_too_large
from sirocco.config import Settings
from sirocco.protocol.limits import JSON_MAX_ITEMS, json_items_at_most, too_many_items

log = logging.getLogger(__name__)

_UNAUTHORIZED = {"detail": "Unauthorized"}
#: Seconds a client refused for too many concurrent uploads is told to wait.
UPLOAD_RETRY_AFTER_S = 5


def needs_key(path: str) -> bool:
    """The /v1 API is behind the key; /health, /metrics, /docs and signed URLs are not."""
    return path == "/v1" or path.startswith("/v1/")


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"


def request_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} "
                    "bytes (sirocco serve --max-request-size)", param=None,
                    code="request_too_large")


def read_timed_out(seconds: float) -> APIError:
    return APIError(408, f"the client sent no part of the request body for {seconds:g} s "
                    "(sirocco serve --read-timeout)", type="timeout_error",
                    code="request_timeout")


def is_json(headers: Headers) -> bool:
    """Whether FastAPI would parse the body as JSON (it does with no content type too)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return not content_type or content_type == "application/json" \
        or content_type.endswith("+json")


def may_have_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


async def send_refusal(send: Send, status: int, body: dict[str, Any],
                       headers: dict[str, str] | None = None, close: bool = True) -> None:
    """A complete JSON answer; with `close`, the connection closes and the body is never
    read (kept open, the server would have to read the whole body to find the next request)."""
    content = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    if close:
        raw.append((b"connection", b"close"))
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content, "more_body": False})


class RequestGuard:
    """ASGI middleware: auth from headers, then a size- and time-limited body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.uploads_in_progress = 0
        # One body at a time is counted: hostile bodies queue here, not in the pool that
        # prepares prompts.
        self.item_counter = ThreadPoolExecutor(1, thread_name_prefix="sirocco-json-items")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        if settings.api_keys and needs_key(scope["path"]) \
                and not authorization_ok(headers.get("authorization"), settings.api_keys):
            await send_refusal(send, 401, _UNAUTHORIZED, {"WWW-Authenticate": "Bearer"},
                               close=may_have_body(headers))
            return
        upload = is_upload(scope)
        if upload:
            limit = settings.max_upload_size + ENVELOPE_ALLOWANCE
            too_large = upload_too_large(settings.max_upload_size)
        else:
            limit = settings.max_request_size
            too_large = request_too_large(limit)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await send_refusal(send, 413, too_large.body())
            return
        if not upload:
            counter = self.item_counter if is_json(headers) else None
            await _LimitedBody(self.app, limit, too_large, settings.read_timeout, counter)(
                scope, receive, send)
            return
        if self.uploads_in_progress >= settings.max_concurrent_uploads:
            busy = APIError(429, f"{self.uploads_in_progress} uploads are already in progress "
                            "(sirocco serve --max-concurrent-uploads); retry later",
                            type="rate_limit_error", code="too_many_uploads")
            await send_refusal(send, 429, busy.body(),
                               {"Retry-After": str(UPLOAD_RETRY_AFTER_S)},
                               close=may_have_body(headers))
            return
        self.uploads_in_progress += 1
        try:
            await _LimitedBody(self.app, limit, too_large, settings.read_timeout)(
                scope, receive, send)
        finally:
            self.uploads_in_progress -= 1


class _LimitedBody:
    """One request whose body may grow to `limit` bytes, with at most `timeout` seconds
    between two of its chunks. Past either, the guard answers (413 or 408) and the app
    sees the client disconnect: what it wrote so far (a partial upload) it drops.

    With an `item_counter` (a JSON body), the body is gathered whole (FastAPI reads it
    whole before parsing anyway) and one past `JSON_MAX_ITEMS` is a 422 naming the field
    that holds most of them, counted in that thread, never parsed."""

    def __init__(self, app: ASGIApp, limit: int, too_large: APIError, timeout: float,
                 item_counter: ThreadPoolExecutor | None = None) -> None:
        self.app = app
        self.limit = limit
        self.too_large = too_large
        self.timeout = timeout
        self.item_counter = item_counter
        self.received = 0
        self.body_done = False
        self.response_started = False
        self.refused = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        try:
            await self.app(scope, self.receive, self.send)
        except Exception:
            if not self.refused:
                raise
            # what the app made of the disconnect we handed it; the client has its answer
            log.debug("after refusing %s %s", scope["method"], scope["path"], exc_info=True)

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:  # later reads only wait for a disconnect: no timeout
            return await self._receive()
        if self.item_counter is None:
            return await self._next_chunk()
        chunks = []
        while not self.body_done:
            message = await self._next_chunk()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        if len(body) > JSON_MAX_ITEMS and json_items_at_most(body) > JSON_MAX_ITEMS:
            error = await asyncio.get_running_loop().run_in_executor(
                self.item_counter, too_many_items, body)
            if error is not None:
                log.info("refused a request body: %s", error["msg"])
                await send_refusal(self._send, 422, {"detail": [error]}, close=False)
                self.refused = True
                return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}

    async def _next_chunk(self) -> Message:
        try:
            message = await asyncio.wait_for(self._receive(), self.timeout)
        except TimeoutError:
            return await self._refuse(read_timed_out(self.timeout))
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                return await self._refuse(self.too_large)
            if not message.get("more_body", False):
                self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.refused:  # the app's own answer to the disconnect: the client has ours
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _refuse(self, error: APIError) -> Message:
        log.info("refused a request body: %s", error.message)
        if not self.response_started:
            await send_refusal(self._send, error.status_code, error.body())
        self.refused = True
        return {"type": "http.disconnect"}
