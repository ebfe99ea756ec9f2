"""Deleting a fine-tuned model while it generates, and adding one while others run, over HTTP.

The demo checkpoint is served as mistral-tiny with two kinds of adapters: one kept for the
whole test and, in each round, a new one trained (added to the engine while the kept one
generates) and deleted while a long request generates on it, streamed or not; the kept one
is archived while it generates (that only marks it). The deleted model's running request
ends (finished on the adapter's weights, or with an error), new requests to it are refused
at once, and the base model and the kept adapter go on serving.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from mistralai.client import Mistral

from tests.conftest import Server, start_server
from tests.test_fine_tuning_e2e import fine_tune
from tests.test_trainer import made_up_pairs

LONG = {"temperature": 0, "max_tokens": 1000, "min_tokens": 1000}
TRAIN = {"training_steps": 3, "learning_rate": 0.01, "seq_len": 128}


def chat(server: Server, model: str, stream: bool = False, **fields) -> dict:
    """A chat request; for a stream, the content and finish reason gathered from its events."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count."}],
            "stream": stream, **fields}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        if not stream:
            r = http.post("/v1/chat/completions", json=body)
            return {"status": r.status_code, "body": r.json()}
        finish, status = None, None
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        finish = choice.get("finish_reason") or finish
        return {"status": status, "finish_reason": finish}


def running_seqs(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sirocco_running_seqs"))


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture()
def server(demo_model_dir: Path, tmp_path: Path):
    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                           "--dtype", "float32"], tmp_path / "data")
    yield server
    server.stop()


def test_deleting_a_fine_tuned_model_while_it_generates_keeps_the_engine_alive(server) -> None:
    client = Mistral(api_key="unused", server_url=server.url)
    pairs = made_up_pairs(4)
    kept = fine_tune(client, server.url, pairs, TRAIN, suffix="kept")
    for round_, stream in enumerate([False, True, False]):
        # The next adapter is added to the engine while the kept one generates.
        busy, busy_out = in_background(chat, server, kept, max_tokens=300, min_tokens=300,
                                       temperature=0)
        if round_ == 0:  # archiving a model in use only marks it: its request goes on
            wait_until(lambda: running_seqs(server) >= 1)
            r = httpx.post(f"{server.url}/v1/fine_tuning/models/{kept}/archive", timeout=30)
            assert r.status_code == 200 and r.json()["archived"] is True, r.text
        victim = fine_tune(client, server.url, pairs, TRAIN, suffix=f"victim{round_}")
        busy.join(120)
        assert busy_out["result"]["status"] == 200, busy_out
        assert busy_out["result"]["body"]["usage"]["completion_tokens"] > 0
        if round_ == 0:
            r = httpx.delete(f"{server.url}/v1/fine_tuning/models/{kept}/archive", timeout=30)
            assert r.status_code == 200 and r.json()["archived"] is False, r.text

        doomed, doomed_out = in_background(chat, server, victim, stream=stream, **LONG)
        wait_until(lambda: running_seqs(server) >= 1)
        time.sleep(0.2)  # a few decode steps on the adapter
        assert httpx.delete(f"{server.url}/v1/models/{victim}", timeout=30).status_code == 200
        doomed.join(120)
        assert not doomed.is_alive(), "the deleted model's request never ended"
        assert "error" not in doomed_out, doomed_out
        ended = doomed_out["result"]
        if stream:
            assert ended["status"] == 200 and ended["finish_reason"] in ("length", "error")
        else:
            assert ended["status"] in (200, 500, 503), ended

        refused = chat(server, victim, max_tokens=4)
        assert refused["status"] in (400, 404), refused
        assert refused["body"]["type"] == "invalid_model"
        for model in ("mistral-tiny", kept):  # the engine serves the base and the kept adapter
            answer = chat(server, model, max_tokens=8, temperature=0)
            assert answer["status"] == 200, (model, answer)
            assert answer["body"]["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: running_seqs(server) == 0)
    assert "EngineDead" not in server.log()
    assert "Traceback" not in server.log()
