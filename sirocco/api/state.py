"""What every request handler may reach: settings, the model registry and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from sirocco.config import Settings
from sirocco.serving.registry import ModelRegistry


@dataclass(slots=True)
class ServerState:
    """Everything one server process owns, built before the app starts."""

    settings: Settings
    registry: ModelRegistry
    extras: dict[str, Any] = field(default_factory=dict)  # optional subsystems, by name


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the server's state."""
    return request.app.state.sirocco


def get_registry(request: Request) -> ModelRegistry:
    """FastAPI dependency: the model registry."""
    return request.app.state.sirocco.registry
