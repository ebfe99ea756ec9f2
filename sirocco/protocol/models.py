"""Wire shapes of the models API (`/v1/models`), as `mistral-openapi.yaml` defines them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCapabilities(BaseModel):
    """What a model can be asked to do; every flag defaults to false."""

    completion_chat: bool = False
    function_calling: bool = False
    reasoning: bool = False
    completion_fim: bool = False
    fine_tuning: bool = False
    vision: bool = False
    ocr: bool = False
    classification: bool = False
    moderation: bool = False
    audio: bool = False
    audio_transcription: bool = False
    audio_transcription_realtime: bool = False
    audio_speech: bool = False
    unified_resources: bool = False


class _CardFields(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sirocco"
    capabilities: ModelCapabilities
    name: str | None = None
    description: str | None = None
    max_context_length: int = 32768
    aliases: list[str] = Field(default_factory=list)
    deprecation: str | None = None
    deprecation_replacement_model: str | None = None
    default_model_temperature: float | None = None
    internal: bool = False


class BaseModelCard(_CardFields):
    """A model served as it was loaded."""

    type: Literal["base"] = "base"


class FTModelCard(_CardFields):
    """A fine-tuned model: a LoRA adapter served on top of its `root` base model."""

    type: Literal["fine-tuned"] = "fine-tuned"
    job: str
    root: str
    archived: bool = False


ModelCard = BaseModelCard | FTModelCard


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BaseModelCard | FTModelCard]


class DeleteModelResponse(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
