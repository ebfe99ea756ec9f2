"""The engine seen through HTTP: prefix-cache usage, aborts on disconnect, /metrics."""

from __future__ import annotations

import re
import time

import httpx

from tests.conftest import Server


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf'^{name}{{model="mistral-tiny"}} (\S+)$', text, re.M)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


def test_repeated_prompt_reports_cached_tokens(demo_server: Server) -> None:
    long_text = " ".join(f"word{i}" for i in range(120))
    body = {"model": "mistral-tiny", "max_tokens": 1,
            "messages": [{"role": "user", "content": long_text}]}
    first = httpx.post(demo_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    second = httpx.post(demo_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    prompt = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] == prompt > 100
    assert prompt - 16 <= cached < prompt  # every full block but the last token is reused


def test_client_disconnect_aborts_the_generation(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": [{"role": "user", "content": "Go on"}],
            "max_tokens": 5000, "stream": True, "min_tokens": 5000}
    with httpx.stream("POST", demo_server.url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(demo_server, "sirocco_running_seqs") >= 1
    deadline = time.monotonic() + 10
    while metric(demo_server, "sirocco_running_seqs") > 0:
        assert time.monotonic() < deadline, "the generation kept running after the disconnect"
        time.sleep(0.1)
    assert metric(demo_server, "sirocco_kv_blocks_used") >= 0


def test_metrics_exposes_engine_gauges_and_histograms(demo_server: Server) -> None:
    httpx.post(demo_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "mistral-tiny", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3})
    text = httpx.get(demo_server.url + "/metrics").text
    for name in ("sirocco_running_seqs", "sirocco_waiting_seqs", "sirocco_kv_blocks_used",
                 "sirocco_kv_blocks_free", "sirocco_prefix_cache_hit_rate",
                 "sirocco_generated_tokens_total", "sirocco_time_to_first_token_seconds_bucket",
                 "sirocco_inter_token_latency_seconds_bucket"):
        assert name in text
    assert metric(demo_server, "sirocco_generated_tokens_total") >= 3
