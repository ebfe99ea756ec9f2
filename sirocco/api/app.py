"""The FastAPI application: routers per resource, auth on /v1, contract-shaped errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from sirocco import __version__
from sirocco.api import completions, embeddings, files, fine_tuning, metrics, models
from sirocco.api.auth import authorization_ok, require_api_key
from sirocco.api.errors import install_error_handlers
from sirocco.api.guard import RequestGuard
from sirocco.api.platform import close_platform, open_platform
from sirocco.api.request_id import RequestId
from sirocco.api.state import ServerState

log = logging.getLogger(__name__)

#: Routers of the /v1 API, all behind the API key when one is configured.
V1_ROUTERS = [models.router, completions.router, embeddings.router, files.router,
              fine_tuning.router]


def create_app(state: ServerState) -> FastAPI:
    """Build the app for an already loaded `ServerState`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for served in state.registry.all():
            if served.engine is not None and not served.fine_tuned:  # adapters share it
                served.engine.start()
        open_platform(state)
        yield
        close_platform(state)
        for served in state.registry.all():
            if served.engine is not None and not served.fine_tuned:
                served.engine.shutdown()
            if served.embedder is not None:
                served.embedder.shutdown()

    app = FastAPI(
        title="Sirocco",
        version=__version__,
        description="A self-hosted implementation of the Mistral AI platform API.",
        lifespan=lifespan,
    )
    app.state.sirocco = state
    app.add_middleware(RequestGuard, settings=state.settings)
    app.add_middleware(RequestId)  # added last: runs first, so refusals carry the id too
    install_error_handlers(app)
    for router in V1_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(files.signed_router)  # the signature is the credential
    app.include_router(metrics.router)  # like /health, open to scrapers

    @app.get("/health", tags=["health"], summary="Liveness and readiness",
             responses={503: {"description": "an engine has stopped"}})
    async def health(request: Request) -> JSONResponse:
        """200 once the models are loaded (the server only listens after loading), 503 when
        a model's engine has stopped. The model ids are shown only to a client with a valid
        key (or to anyone when the server has none)."""
        served = state.registry.all()
        dead = [m.id for m in served if m.engine is not None and not m.engine.is_running]
        body: dict = {"status": "unavailable" if dead else "ok"}
        if authorization_ok(request.headers.get("authorization"), state.settings.api_keys):
            body["models"] = [m.id for m in served]
            if dead:
                body["unavailable_models"] = dead
        return JSONResponse(body, status_code=503 if dead else 200)

    return app
