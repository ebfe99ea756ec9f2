"""Big inputs never block the event loop (issue 15 item 3, issue 22 item 3).

While one hostile request is prepared (a 2-million-character FIM prompt, a chat of 100,000
messages, a large embeddings batch), /health is probed every 100 ms from another thread;
the slowest probe stays low. The hostile requests are refused (above the protocol's caps:
a 422 naming the field) or answered; either way the server serves afterwards.

Measured on a 2-core CPU before the work moved off the loop: the FIM prompt blocked
/health for 2.4 s, the embeddings answer (24 MB of JSON) for 0.7-1.4 s; after, 30-50 ms.
The chat of 100,000 messages is refused (above 10,000) before its body is walked: ~60 ms.

Bodies of 10-14 MB made of many small values (a `logit_bias` of 10^6 entries, 2 million
stop strings, 400,000 content chunks, 5 million numbers under `metadata`) blocked /health
for 2.3-7.9 s while Python's JSON parser and pydantic held the interpreter; now their items
are counted (in a thread) before anything parses them, and past `JSON_MAX_ITEMS` they are a
422 naming the field: slowest /health 25-65 ms. A body past --max-request-size (16 MiB by
default) is a 413 from its Content-Length.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sirocco.config import Settings
from sirocco.protocol.limits import (
    EMBEDDING_MAX_INPUTS,
    JSON_MAX_ITEMS,
    LOGIT_BIAS_MAX_ENTRIES,
    SCHEMA_MAX_BYTES,
    STOP_MAX_COUNT,
)
from tests.conftest import Server, start_server

MAX_HEALTH_LATENCY = 1.0  # seconds
MAX_HEALTH_LATENCY_OFF_LOOP = 0.5  # where only the body's parsing remains on the loop


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                      "--served-model-name", "codestral-latest", "--dtype", "float32"],
                     tmp_path_factory.mktemp("event-loop"))
    yield s
    s.stop()


def while_probing(server: Server, path: str, body: dict) -> tuple[httpx.Response, float]:
    """POST `body` (encoded beforehand) while /health is probed every 100 ms; the answer
    and the slowest probe in seconds."""
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - start)
                stop.wait(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.3)
        answer = httpx.post(server.url + path, content=payload, timeout=600,
                            headers={"Content-Type": "application/json"})
        time.sleep(0.2)
    finally:
        stop.set()
        prober.join()
    return answer, max(latencies)


def assert_422_naming(answer: httpx.Response, field: str) -> dict:
    assert answer.status_code == 422, answer.text[:300]
    detail = answer.json()["detail"]
    assert any(d["loc"][:2] == ["body", field] for d in detail), answer.text[:300]
    return detail[0]


CHAT = {"model": "mistral-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body, field, words", [
    ({"logit_bias": {str(i): 1 for i in range(10**6)}}, "logit_bias",
     str(LOGIT_BIAS_MAX_ENTRIES)),
    ({"stop": ["ab"] * 2_000_000}, "stop", str(STOP_MAX_COUNT)),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"}] * 400_000}]},
     "messages", str(JSON_MAX_ITEMS)),
    ({"metadata": {"x": [[0, 0, 0, 0]] * 1_000_000}}, "metadata", str(JSON_MAX_ITEMS)),
    ({"messages": [{"role": "user", "content": "x" * 10_000_000}]}, "messages", "characters"),
], ids=["logit-bias-1e6", "stop-2e6", "content-chunks-4e5", "metadata-5e6-numbers",
        "text-10M-characters"])
def test_a_body_of_10_mb_does_not_block(server: Server, body: dict, field: str,
                                        words: str) -> None:
    body = {**CHAT, **body}
    answer, slowest = while_probing(server, "/v1/chat/completions", body)
    size = len(json.dumps(body)) / 1e6
    print(f"{size:.1f} MB body: {answer.status_code}, slowest /health {slowest * 1000:.0f} ms")
    assert size >= 10
    detail = assert_422_naming(answer, field)
    assert words in detail["msg"], detail
    assert len(answer.content) < 2000  # the input is not echoed back
    assert slowest < MAX_HEALTH_LATENCY_OFF_LOOP


def test_a_body_past_the_default_request_size_is_413(server: Server) -> None:
    limit = Settings().max_request_size
    assert limit == 16 * 1024 * 1024
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * limit}]}
    answer, slowest = while_probing(server, "/v1/chat/completions", body)
    assert answer.status_code == 413, answer.text[:300]
    assert answer.json()["code"] == "request_too_large"
    assert slowest < MAX_HEALTH_LATENCY_OFF_LOOP


def test_a_body_within_the_item_bound_is_parsed(server: Server) -> None:
    """Just under JSON_MAX_ITEMS: parsed and answered, and the loop still answers."""
    body = {**CHAT, "metadata": {"x": [0] * (JSON_MAX_ITEMS - 100)}}
    answer, slowest = while_probing(server, "/v1/chat/completions", body)
    assert answer.status_code == 200, answer.text[:300]
    assert slowest < MAX_HEALTH_LATENCY


def test_a_two_million_character_fim_prompt_does_not_block(server: Server) -> None:
    prompt = "def f(x):\n    return x + 1\n" * 80_000  # 2.2 million characters
    answer, slowest = while_probing(server, "/v1/fim/completions",
                                    {"model": "codestral-latest", "prompt": prompt,
                                     "max_tokens": 4})
    print(f"FIM of {len(prompt):,} characters: {answer.status_code}, "
          f"slowest /health {slowest * 1000:.0f} ms")
    assert_422_naming(answer, "prompt")
    assert slowest < MAX_HEALTH_LATENCY_OFF_LOOP


def test_a_chat_of_100000_messages_does_not_block(server: Server) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                for i in range(100_000)]
    answer, slowest = while_probing(server, "/v1/chat/completions",
                                    {"model": "mistral-tiny", "messages": messages,
                                     "max_tokens": 4})
    print(f"chat of {len(messages):,} messages: {answer.status_code}, "
          f"slowest /health {slowest * 1000:.0f} ms")
    assert_422_naming(answer, "messages")
    assert slowest < MAX_HEALTH_LATENCY


def test_a_large_embeddings_answer_does_not_block(server: Server) -> None:
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    if "mistral-embed" not in models:
        pytest.skip("no embedding model is served")
    inputs = [f"sentence {i}" for i in range(EMBEDDING_MAX_INPUTS)]
    answer, slowest = while_probing(server, "/v1/embeddings",
                                    {"model": "mistral-embed", "input": inputs})
    print(f"embeddings of {len(inputs):,} inputs: {answer.status_code}, "
          f"{len(answer.content) / 1e6:.1f} MB, slowest /health {slowest * 1000:.0f} ms")
    assert answer.status_code == 200 and len(answer.json()["data"]) == len(inputs)
    assert slowest < MAX_HEALTH_LATENCY_OFF_LOOP


def test_100000_embedding_inputs_are_refused_without_blocking(server: Server) -> None:
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    if "mistral-embed" not in models:
        pytest.skip("no embedding model is served")
    inputs = [f"sentence {i}" for i in range(100_000)]
    answer, slowest = while_probing(server, "/v1/embeddings",
                                    {"model": "mistral-embed", "input": inputs})
    print(f"embeddings of {len(inputs):,} inputs: {answer.status_code}, "
          f"slowest /health {slowest * 1000:.0f} ms")
    detail = assert_422_naming(answer, "input")
    assert str(EMBEDDING_MAX_INPUTS) in detail["msg"]
    assert slowest < MAX_HEALTH_LATENCY


def test_a_schema_at_the_size_cap_compiles_off_the_loop(server: Server) -> None:
    properties = {f"p{i}": {"type": "string", "pattern": "^[a-z]{1,8}(-[0-9]{2,4})?$"}
                  for i in range(900)}
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    assert 60_000 < len(json.dumps(schema, separators=(",", ":"))) <= SCHEMA_MAX_BYTES
    answer, slowest = while_probing(server, "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "big", "schema": schema}}})
    print(f"a 64 KB schema: {answer.status_code}, slowest /health {slowest * 1000:.0f} ms")
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["usage"]["completion_tokens"] >= 1
    assert slowest < MAX_HEALTH_LATENCY_OFF_LOOP


def test_the_server_serves_afterwards(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "mistral-tiny", "max_tokens": 3,
                         "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
