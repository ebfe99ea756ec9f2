"""Bearer-key authentication for the /v1 routes.

With keys configured, a request needs `Authorization: Bearer <key>` matching one of
them; keys are compared in constant time and never logged. With no key the server is
open (the startup log says so). The check runs twice: in `RequestGuard` (sirocco/api/guard.py),
from the headers alone before any body byte is read, and as the routes' dependency, which
is what `/docs` shows.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="An API key given to `sirocco serve --api-key`")


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time check of `given` against every configured key."""
    given_bytes = given.encode()
    matched = False
    for key in keys:  # no early exit: the time taken does not tell which key nearly matched
        matched |= hmac.compare_digest(given_bytes, key.encode())
    return matched


def authorization_ok(header: str | None, keys: list[str]) -> bool:
    """Whether an `Authorization` header value carries one of `keys` as a bearer token."""
    if not keys:
        return True
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and key_matches(token.strip(), keys)


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """FastAPI dependency: 401 unless auth is off or the bearer key is valid."""
    keys = request.app.state.sirocco.settings.api_keys
    if not authorization_ok(request.headers.get("authorization"), keys):
        raise HTTPException(status_code=401, detail="Unauthorized")
