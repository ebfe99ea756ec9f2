"""A client that leaves frees its sequence, streamed or not (issue 15, item 4).

Each test starts a generation far longer than the client waits, lets the client time out,
then watches /metrics: the running batch is empty again within a second or so, and the
engine generated far fewer tokens than max_tokens would have cost.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import Server

LONG = {"model": "mistral-tiny", "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0, "min_tokens": 6000, "max_tokens": 6000}


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def wait_until_idle(server: Server, limit: float = 5.0) -> float:
    """Seconds until sirocco_running_seqs is 0 (fails after `limit`)."""
    start = time.monotonic()
    while metric(server, "sirocco_running_seqs") != 0:
        assert time.monotonic() - start < limit, "the sequence is still running"
        time.sleep(0.05)
    return time.monotonic() - start


def time_out_waiting(server: Server, body: dict) -> None:
    """A client that gives up on a non-streamed answer after one second."""
    with pytest.raises(httpx.TimeoutException):
        with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as client:
            with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                for _ in r.iter_bytes():
                    pass


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_leaves_frees_its_sequence(demo_server: Server, stream: bool) -> None:
    wait_until_idle(demo_server, limit=60)  # (nothing left over from other tests)
    before = metric(demo_server, "sirocco_generated_tokens_total")
    if stream:
        read_a_little_and_hang_up(demo_server, {**LONG, "stream": True})
    else:
        time_out_waiting(demo_server, LONG)
    freed_in = wait_until_idle(demo_server)
    time.sleep(0.5)  # had it kept running, the count would grow now
    generated = metric(demo_server, "sirocco_generated_tokens_total") - before
    print(f"stream={stream}: freed {freed_in:.2f} s after the client left; "
          f"{generated:.0f} of {LONG['max_tokens']} tokens generated")
    assert generated < LONG["max_tokens"] / 2


def read_a_little_and_hang_up(server: Server, body: dict) -> None:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break


def test_the_server_serves_after_clients_left(demo_server: Server) -> None:
    r = httpx.post(demo_server.url + "/v1/chat/completions",
                   json={**LONG, "min_tokens": 0, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
