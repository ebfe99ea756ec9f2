"""The models API as SDK users see it."""

from __future__ import annotations

import httpx
import pytest
from mistralai.client import Mistral
from openai import OpenAI

from tests.conftest import Server


@pytest.fixture()
def mistral(demo_server: Server) -> Mistral:
    return Mistral(api_key="unused", server_url=demo_server.url)


def test_mistral_sdk_lists_served_models_with_aliases(mistral: Mistral) -> None:
    models = mistral.models.list()
    ids = [m.id for m in models.data]
    assert "mistral-tiny" in ids
    card = next(m for m in models.data if m.id == "mistral-tiny")
    assert card.type == "base"
    assert "mistralai/mistral-tiny" in card.aliases
    assert "codestral-latest" in card.aliases
    assert card.capabilities.completion_chat is True
    assert card.capabilities.completion_fim is True  # the demo model has Mistral's v3 FIM tokens
    assert card.max_context_length == 8192


def test_mistral_sdk_retrieves_a_model_by_alias(mistral: Mistral) -> None:
    card = mistral.models.retrieve(model_id="mistralai/mistral-tiny")
    assert card.id == "mistral-tiny"


def test_openai_sdk_lists_and_retrieves(demo_server: Server) -> None:
    client = OpenAI(api_key="unused", base_url=demo_server.url + "/v1")
    ids = [m.id for m in client.models.list()]
    assert "mistral-tiny" in ids
    assert client.models.retrieve("mistral-tiny").owned_by == "sirocco"


def test_unknown_model_is_404_json(demo_server: Server) -> None:
    r = httpx.get(demo_server.url + "/v1/models/ft:open-mistral-7b:587a6b29:20240514:7e773925")
    assert r.status_code == 404
    body = r.json()
    assert body["object"] == "error"
    assert "ft:open-mistral-7b:587a6b29:20240514:7e773925" in body["message"]


def test_deleting_a_base_model_is_refused(demo_server: Server) -> None:
    r = httpx.delete(demo_server.url + "/v1/models/mistral-tiny")
    assert r.status_code == 400
    assert "base model" in r.json()["message"]
    assert httpx.get(demo_server.url + "/v1/models/mistral-tiny").status_code == 200


def test_model_list_filters_by_model(demo_server: Server) -> None:
    r = httpx.get(demo_server.url + "/v1/models", params={"model": "codestral-latest"})
    assert [m["id"] for m in r.json()["data"]] == ["mistral-tiny"]


def test_openapi_describes_the_models_routes(demo_server: Server) -> None:
    spec = httpx.get(demo_server.url + "/openapi.json").json()
    assert "/v1/models" in spec["paths"]
    assert "delete" in spec["paths"]["/v1/models/{model_id}"]
    assert httpx.get(demo_server.url + "/docs").status_code == 200
