"""Errors in the contract's shapes, and bearer-key auth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from tests.conftest import Server, start_server


@pytest.fixture(scope="module")
def locked_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with two API keys: one from the flag, one from SIROCCO_API_KEY."""
    server = start_server(
        ["--model", str(demo_model_dir), "--api-key", "key-from-flag"],
        tmp_path_factory.mktemp("locked"),
        env={"SIROCCO_API_KEY": "ignored-when-flag-given"},
    )
    yield server
    server.stop()


def test_missing_key_is_401_unauthorized(locked_server: Server) -> None:
    r = httpx.get(locked_server.url + "/v1/models")
    assert r.status_code == 401
    assert r.json() == {"detail": "Unauthorized"}


def test_wrong_key_is_401(locked_server: Server) -> None:
    r = httpx.get(locked_server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.json() == {"detail": "Unauthorized"}


def test_right_key_is_accepted_by_the_sdk(locked_server: Server) -> None:
    client = Mistral(api_key="key-from-flag", server_url=locked_server.url)
    assert client.models.list().data
    with pytest.raises(SDKError) as err:
        Mistral(api_key="wrong", server_url=locked_server.url).models.list()
    assert err.value.status_code == 401


def test_health_needs_no_key(locked_server: Server) -> None:
    assert httpx.get(locked_server.url + "/health").status_code == 200


def test_keys_never_reach_the_log(locked_server: Server) -> None:
    httpx.get(locked_server.url + "/v1/models", headers={"Authorization": "Bearer key-from-flag"})
    log = locked_server.log()
    assert "auth is ON" in log
    assert "key-from-flag" not in log


def test_env_key_works_without_flag(demo_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        ["--model", str(demo_model_dir)], tmp_path, env={"SIROCCO_API_KEY": "env-key-1,env-key-2"}
    )
    try:
        for key in ("env-key-1", "env-key-2"):
            r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
    finally:
        assert server.stop() == 0  # Ctrl-C shuts down cleanly


def test_open_server_says_auth_is_off(demo_server: Server) -> None:
    assert "auth is OFF" in demo_server.log()


def test_unknown_route_is_404_json(demo_server: Server) -> None:
    r = httpx.get(demo_server.url + "/v1/no-such-thing")
    assert r.status_code == 404
    assert r.json()["object"] == "error"


def test_wrong_method_is_405_json(demo_server: Server) -> None:
    r = httpx.put(demo_server.url + "/v1/models")
    assert r.status_code == 405
    assert "not allowed" in r.json()["message"]
