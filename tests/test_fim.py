"""FIM completions at /v1/fim/completions (Codestral's suffix-first encoding)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import mistral_common
import pytest
from mistralai.client import Mistral

from tests.conftest import Server, start_server


@pytest.fixture()
def mistral(demo_server: Server) -> Mistral:
    return Mistral(api_key="unused", server_url=demo_server.url)


def test_sdk_fim_complete(mistral: Mistral) -> None:
    res = mistral.fim.complete(model="codestral-latest", prompt="def add(a, b):",
                               suffix="    return c", max_tokens=6, temperature=0)
    assert res.object == "chat.completion"
    assert res.model == "codestral-latest"
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 6


def test_sdk_fim_stream_matches_complete(mistral: Mistral) -> None:
    args = dict(model="codestral-latest", prompt="x = ", suffix="\nprint(x)", max_tokens=5,
                temperature=0)
    full = mistral.fim.complete(**args).choices[0].message.content
    streamed = "".join(e.data.choices[0].delta.content or "" for e in mistral.fim.stream(**args))
    assert streamed == full


def test_suffix_changes_the_completion(demo_server: Server) -> None:
    def complete(body: dict) -> str:
        r = httpx.post(demo_server.url + "/v1/fim/completions", timeout=60,
                       json={"model": "codestral-latest", "prompt": "def f(", "max_tokens": 8,
                             "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    no_suffix = complete({})
    assert complete({"suffix": ""}) == no_suffix  # a missing suffix is an empty one, still FIM
    assert complete({"suffix": "return 42\n"}) != no_suffix


@pytest.mark.parametrize("body, field", [
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": None}, "prompt"),
])
def test_fim_validation_is_422(demo_server: Server, body: dict, field: str) -> None:
    r = httpx.post(demo_server.url + "/v1/fim/completions",
                   json={"model": "codestral-latest", "prompt": "a", **body})
    assert r.status_code == 422
    assert field in r.text


@pytest.fixture(scope="module")
def no_fim_server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Server]:
    """The demo weights with Mistral's v1 tokenizer, which has no FIM tokens."""
    model = tmp_path_factory.mktemp("v1-model")
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(demo_model_dir / name, model / name)
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1",
                    model / "tokenizer.model.v1")
    server = start_server(["--model", str(model), "--served-model-name", "old-mistral"],
                          tmp_path_factory.mktemp("v1-data"))
    yield server
    server.stop()


def test_model_without_fim_tokens_is_400(no_fim_server: Server) -> None:
    card = httpx.get(no_fim_server.url + "/v1/models/old-mistral").json()
    assert card["capabilities"]["completion_fim"] is False
    r = httpx.post(no_fim_server.url + "/v1/fim/completions",
                   json={"model": "old-mistral", "prompt": "def f(", "suffix": "x"})
    assert r.status_code == 400
    assert "fill-in-the-middle" in r.json()["message"]
