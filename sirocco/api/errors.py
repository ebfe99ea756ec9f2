"""Errors as values a client can act on, in the contract's shapes.

- 422: `{"detail": [{"loc", "msg", "type", ...}]}` for every validation error;
- 400/404/409/413/...: `{"object": "error", "message", "type", "param", "code"}`;
- 401: `{"detail": "Unauthorized"}`;
- anything unexpected: a 500 with a generic message; the traceback goes to the log only.

Error bodies are valid JSON whatever the client sent: text is stripped of lone
surrogates, and the offending input is echoed only as a short, JSON-safe rendering.
"""

from __future__ import annotations

import logging
import math
import reprlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused or should know about, answered as `ErrorResponse`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        message = safe_text(self.message)
        param = safe_text(self.param) if self.param is not None else None
        if self.status_code == 422:  # the contract's only 422 shape
            loc: list[str | int] = ["body", param] if param else ["body"]
            return {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}
        return {
            "object": "error",
            "message": message,
            "type": self.type,
            "param": param,
            "code": self.code,
        }


def invalid_model(model: str) -> APIError:
    """What the real API answers for an unknown model id."""
    return APIError(
        400, f"Invalid model: {model}", type="invalid_model", param="model", code="1500"
    )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, f"{what} {ident!r} not found", type="not_found_error")


def validation_error(loc: list[str | int], msg: str, type: str = "value_error") -> JSONResponse:
    """A 422 for a check that cannot live in a pydantic model (it needs server state)."""
    return JSONResponse(
        status_code=422, content={"detail": [{"loc": loc, "msg": safe_text(msg), "type": type}]}
    )


#: Longest rendering of a client's input that an error body echoes.
ECHO_MAX_CHARS = 200

_ECHO_REPR = reprlib.Repr()
_ECHO_REPR.maxlevel = 3
_ECHO_REPR.maxstring = ECHO_MAX_CHARS
_ECHO_REPR.maxother = ECHO_MAX_CHARS


def safe_text(text: str, limit: int | None = None) -> str:
    """`text` without lone surrogates (written as `\\udxxx`, which UTF-8 cannot encode),
    cut to `limit` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


def safe_echo(value: Any) -> Any:
    """A JSON-safe rendering of a client's input, in at most about `ECHO_MAX_CHARS`:
    small values as they are (surrogates escaped), NaN and infinities as strings, big
    integers and anything large or deep as a truncated repr."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**64 else safe_text(_ECHO_REPR.repr(value), ECHO_MAX_CHARS)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return safe_text(value, ECHO_MAX_CHARS)
    text = _ECHO_REPR.repr(value)  # bounded in depth and width, whatever the value
    if isinstance(value, (list, dict)) and len(text) <= ECHO_MAX_CHARS and "..." not in text:
        if isinstance(value, list):
            return [safe_echo(v) for v in value]
        return {safe_text(str(k)): safe_echo(v) for k, v in value.items()}
    return safe_text(text, ECHO_MAX_CHARS)


def _clean_validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        item = {
            "type": err["type"],
            "loc": [p if isinstance(p, int) else safe_text(str(p), ECHO_MAX_CHARS)
                    for p in err["loc"]],
            "msg": safe_text(str(err["msg"])),
        }
        if "input" in err:
            item["input"] = safe_echo(err["input"])
        if err.get("ctx"):
            item["ctx"] = {
                k: (safe_echo(v) if isinstance(v, (str, int, float, bool)) else safe_text(str(v)))
                for k, v in err["ctx"].items()
            }
        cleaned.append(item)
    return jsonable_encoder(cleaned)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            status_code=422, content={"detail": _clean_validation_errors(exc.errors())}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 401:
            return JSONResponse(
                status_code=401,
                content={"detail": "Unauthorized"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        if exc.status_code == 404 and exc.detail == "Not Found":
            body = APIError(
                404, f"no route matches {request.method} {request.url.path}", type="not_found_error"
            ).body()
            return JSONResponse(status_code=404, content=body)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when the JSON parser fails other than on syntax: a body
            # nested deeper than Python's recursion limit.
            body = APIError(400, "the body could not be parsed as JSON (is it nested too "
                            "deeply?)").body()
            return JSONResponse(status_code=400, content=body)
        if exc.status_code == 405:
            body = APIError(
                405,
                f"method {request.method} is not allowed on {request.url.path}",
                type="invalid_request_error",
            ).body()
            return JSONResponse(status_code=405, content=body, headers=exc.headers)
        return JSONResponse(
            status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = APIError(
            500, "internal server error; the server log has the details", type="internal_error"
        ).body()
        return JSONResponse(status_code=500, content=body)
