"""Overload and deadlines over HTTP: a 429 with Retry-After past --max-waiting, counted in
/metrics; --request-timeout ends a long generation with an error and frees it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server

LONG = {"model": "mistral-tiny", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 200, "temperature": 0}


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                      "--dtype", "float32", "--max-num-seqs", "2", "--max-waiting", "1",
                      "--request-timeout", "0.5", "--kv-cache-memory", "16MiB"],
                     tmp_path_factory.mktemp("overload-data"))
    yield s
    s.stop()


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def test_a_burst_past_max_waiting_gets_429_with_retry_after(server: Server) -> None:
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {**LONG, "max_tokens": 20}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body)
                                          for _ in range(12)))

    answers = asyncio.run(burst())
    refused = [r for r in answers if r.status_code == 429]
    # (admitted ones may also meet the short --request-timeout of this server: a 504)
    assert refused and all(r.status_code in (200, 429, 504) for r in answers)
    assert sum(r.status_code != 429 for r in answers) >= 3
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        body = r.json()
        assert set(body) == {"object", "message", "type", "param", "code"}
        assert body["object"] == "error" and "max-waiting" in body["message"]
    assert metric(server, "sirocco_rejected_requests_total") >= len(refused)


def test_request_timeout_is_a_504_and_frees_the_sequence(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={**LONG, "min_tokens": 1000, "max_tokens": 1000}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["type"] == "timeout_error"
    assert metric(server, "sirocco_timed_out_requests_total") >= 1
    assert metric(server, "sirocco_running_seqs") == 0
    assert metric(server, "sirocco_kv_blocks_used") == 0  # its KV is freed
    assert metric(server, "sirocco_kv_blocks_free") > 0


def test_a_timed_out_stream_ends_with_finish_reason_error(server: Server) -> None:
    body = {**LONG, "min_tokens": 1000, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "error"
    assert "usage" in chunks[-1]
    assert all("usage" not in c for c in chunks[:-1])
    assert any(line.startswith(": error") for line in lines)


def test_the_server_still_serves_afterwards(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={**LONG, "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
