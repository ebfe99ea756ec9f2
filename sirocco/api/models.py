"""`/v1/models`: list, retrieve and delete the models this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from sirocco.api.errors import APIError, not_found
from sirocco.api.state import get_registry
from sirocco.protocol.models import BaseModelCard, DeleteModelResponse, FTModelCard, ModelList
from sirocco.serving.registry import ModelRegistry, UnknownModel

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="List models")
async def list_models(
    provider: str | None = None,
    model: str | None = None,
    registry: ModelRegistry = Depends(get_registry),
) -> ModelList:
    """Every served model; `model` filters by id or alias, `provider` by owner."""
    cards = [m.card() for m in registry.all()]
    if model:
        cards = [c for c in cards if model == c.id or model in c.aliases]
    if provider:
        cards = [c for c in cards if c.owned_by == provider]
    return ModelList(data=cards)


@router.get(
    "/v1/models/{model_id:path}",
    response_model=BaseModelCard | FTModelCard,
    summary="Retrieve a model",
)
async def retrieve_model(
    model_id: str, registry: ModelRegistry = Depends(get_registry)
) -> BaseModelCard | FTModelCard:
    """One model's card, by id or alias (fine-tuned ids contain colons)."""
    try:
        return registry.get(model_id).card()
    except UnknownModel:
        raise not_found("model", model_id) from None


@router.delete(
    "/v1/models/{model_id:path}",
    response_model=DeleteModelResponse,
    summary="Delete a fine-tuned model",
)
async def delete_model(
    model_id: str, request: Request, registry: ModelRegistry = Depends(get_registry)
) -> DeleteModelResponse:
    """Delete a fine-tuned model; base models are part of the server's configuration."""
    try:
        served = registry.get(model_id)
    except UnknownModel:
        raise not_found("model", model_id) from None
    if not served.fine_tuned:
        raise APIError(
            400,
            f"model {served.id!r} is a base model and cannot be deleted; "
            "only fine-tuned models can",
            param="model_id",
        )
    registry.remove(served.id)  # new requests are refused from now on
    # Applied by the engine's loop between two steps; requests running on the adapter
    # finish on it and it is unloaded after them.
    await run_in_threadpool(served.engine.remove_adapter, served.id)
    on_deleted = request.app.state.sirocco.extras.get("on_model_deleted")
    if on_deleted is not None:  # the platform drops its database row and adapter
        await run_in_threadpool(on_deleted, served.id)
    return DeleteModelResponse(id=served.id)
