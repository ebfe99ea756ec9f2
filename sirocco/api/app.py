"""The FastAPI application: routers per resource, auth on /v1, contract-shaped errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from sirocco import __version__
from sirocco.api import completions, embeddings, files, fine_tuning, metrics, models
from sirocco.api.auth import require_api_key
from sirocco.api.errors import install_error_handlers
from sirocco.api.platform import close_platform, open_platform
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
    install_error_handlers(app)
    for router in V1_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(files.signed_router)  # the signature is the credential
    app.include_router(metrics.router)  # like /health, open to scrapers

    @app.get("/health", tags=["health"], summary="Liveness and readiness")
    async def health() -> JSONResponse:
        """200 once the models are loaded (the server only listens after loading)."""
        return JSONResponse({"status": "ok", "models": [m.id for m in state.registry.all()]})

    return app
