"""Errors as values a client can act on, in the contract's shapes.

- 422: `{"detail": [{"loc", "msg", "type", ...}]}` for every validation error;
- 400/404/409/413/...: `{"object": "error", "message", "type", "param", "code"}`;
- 401: `{"detail": "Unauthorized"}`;
- anything unexpected: a 500 with a generic message; the traceback goes to the log only.
"""

from __future__ import annotations

import logging
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
        if self.status_code == 422:  # the contract's only 422 shape
            loc: list[str | int] = ["body", self.param] if self.param else ["body"]
            return {"detail": [{"loc": loc, "msg": self.message, "type": "value_error"}]}
        return {
            "object": "error",
            "message": self.message,
            "type": self.type,
            "param": self.param,
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
        status_code=422, content={"detail": [{"loc": loc, "msg": msg, "type": type}]}
    )


def _clean_validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        item = {"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]}
        if "input" in err:
            item["input"] = err["input"]
        if err.get("ctx"):
            item["ctx"] = {
                k: (v if isinstance(v, (str, int, float, bool)) else str(v))
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
