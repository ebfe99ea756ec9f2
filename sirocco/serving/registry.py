"""The models one server answers for, by id and alias.

A `ServedModel` is what a request's `model` field resolves to: a loaded base model
(tokenizer + engine, or an embedding encoder), or a fine-tuned adapter on top of one.
The registry owns the id namespace; it knows nothing of HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sirocco.protocol.models import BaseModelCard, FTModelCard, ModelCapabilities


class UnknownModel(LookupError):
    """No served model has this id or alias."""


@dataclass(slots=True)
class ServedModel:
    """One id that requests can name, with what it needs to answer them."""

    id: str
    kind: str  # "generate" or "embed"
    description: str
    max_context_length: int
    capabilities: ModelCapabilities
    aliases: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "sirocco"
    name: str | None = None
    tokenizer: Any = None  # sirocco.tokenizers.base.Tokenizer for generative models
    engine: Any = None  # sirocco.engine.AsyncEngine for generative models
    embedder: Any = None  # an embedding encoder for "embed" models
    source: str = ""  # where the weights came from
    # Fine-tuned models only:
    root: str | None = None
    job: str | None = None
    archived: bool = False
    adapter: Any = None

    @property
    def fine_tuned(self) -> bool:
        return self.root is not None

    def card(self) -> BaseModelCard | FTModelCard:
        common: dict[str, Any] = dict(
            id=self.id,
            created=self.created,
            owned_by=self.owned_by,
            capabilities=self.capabilities,
            name=self.name or self.id,
            description=self.description,
            max_context_length=self.max_context_length,
            aliases=list(self.aliases),
        )
        if self.fine_tuned:
            return FTModelCard(
                **common, job=self.job or "", root=self.root or "", archived=self.archived
            )
        return BaseModelCard(**common)


class ModelRegistry:
    """Ids and aliases -> served models; fine-tuned models come and go at run time."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._names: dict[str, str] = {}

    def add(self, model: ServedModel) -> None:
        for name in [model.id, *model.aliases]:
            if name in self._names and self._names[name] != model.id:
                raise ValueError(f"model name {name!r} is already taken by {self._names[name]!r}")
        self._models[model.id] = model
        for name in [model.id, *model.aliases]:
            self._names[name] = model.id

    def remove(self, model_id: str) -> ServedModel:
        model = self.get(model_id)
        del self._models[model.id]
        self._names = {n: i for n, i in self._names.items() if i != model.id}
        return model

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[self._names[name]]
        except KeyError:
            raise UnknownModel(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def all(self) -> list[ServedModel]:
        return list(self._models.values())
