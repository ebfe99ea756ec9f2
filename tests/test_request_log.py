"""Each chat, FIM and embeddings request leaves one info line in the server log (issue 15,
item 7): its id, model, token counts, time to first token, duration and finish reason,
never the prompt text nor the API key."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server

KEY = "sk-very-secret-key-4242"
SECRET_PROMPT = "my password is hunter2-zebra"
LINE = re.compile(
    r"request id=(?P<id>\S+) endpoint=(?P<endpoint>\w+) model=(?P<model>\S+) "
    r"status=(?P<status>\d+) response_id=(?P<response_id>\S+) "
    r"prompt_tokens=(?P<prompt>\d+) completion_tokens=(?P<completion>\d+) "
    r"cached_tokens=(?P<cached>\d+) ttft=(?P<ttft>\S+) duration=(?P<duration>[\d.]+)s "
    r"finish=(?P<finish>\S+)$")


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                      "--served-model-name", "codestral-latest", "--dtype", "float32",
                      "--api-key", KEY], tmp_path_factory.mktemp("request-log"))
    yield s
    s.stop()


def post(server: Server, path: str, body: dict) -> httpx.Response:
    r = httpx.post(server.url + path, json=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r


def lines_for(server: Server, response_id: str) -> list[re.Match]:
    """The request lines whose response_id is `response_id` (waiting a little for them)."""
    for _ in range(50):
        found = [m for line in server.log().splitlines()
                 if (m := LINE.search(line)) and m["response_id"] == response_id]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_a_chat_request_logs_one_line_with_its_numbers(server: Server) -> None:
    body = post(server, "/v1/chat/completions", {
        "model": "mistral-tiny", "max_tokens": 7, "temperature": 0,
        "messages": [{"role": "user", "content": SECRET_PROMPT}]}).json()
    (line,) = lines_for(server, body["id"])
    assert line["endpoint"] == "chat" and line["model"] == "mistral-tiny"
    assert line["status"] == "200"
    assert int(line["prompt"]) == body["usage"]["prompt_tokens"]
    assert int(line["completion"]) == body["usage"]["completion_tokens"] == 7
    assert int(line["cached"]) == body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert line["finish"] == "length"
    ttft = float(line["ttft"].removesuffix("s"))
    assert 0 < ttft <= float(line["duration"])
    assert line["id"]  # (the middleware's id, or one made up here)


def test_a_stream_logs_its_line_when_it_ends(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "mistral-tiny", "max_tokens": 5, "stream": True,
                            "n": 2, "messages": [{"role": "user", "content": "Hi"}]}) as r:
        data = [line for line in r.iter_lines() if line.startswith("data: {")]
    response_id = re.search(r'"id": "([^"]+)"', data[0])[1]
    (line,) = lines_for(server, response_id)
    assert line["status"] == "200" and line["finish"] == "length,length"
    assert line["completion"] == "10"


def test_fim_and_embeddings_log_lines(server: Server) -> None:
    fim = post(server, "/v1/fim/completions", {"model": "codestral-latest", "max_tokens": 4,
                                               "prompt": "def f(", "suffix": "return 1"}).json()
    (line,) = lines_for(server, fim["id"])
    assert line["endpoint"] == "fim" and line["model"] == "codestral-latest"
    assert line["completion"] == "4"
    models = httpx.get(server.url + "/v1/models",
                       headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    if "mistral-embed" not in {m["id"] for m in models}:
        pytest.skip("no embedding model is served")
    embedded = post(server, "/v1/embeddings", {"model": "mistral-embed",
                                               "input": ["one", SECRET_PROMPT]}).json()
    (line,) = lines_for(server, embedded["id"])
    assert line["endpoint"] == "embeddings"
    assert int(line["prompt"]) == embedded["usage"]["prompt_tokens"] > 0
    assert line["ttft"] == "-" and line["finish"] == "-"


def test_a_client_that_leaves_is_logged_as_499(server: Server) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "mistral-tiny", "min_tokens": 5000, "max_tokens": 5000,
                         "messages": [{"role": "user", "content": "Hi"}]})
    for _ in range(50):
        left = [m for line in server.log().splitlines()
                if (m := LINE.search(line)) and m["status"] == "499"]
        if left:
            break
        time.sleep(0.1)
    assert left and int(left[0]["completion"]) < 5000


def test_the_log_never_holds_the_prompt_or_the_key(server: Server) -> None:
    log = server.log()
    assert "request id=" in log
    assert SECRET_PROMPT not in log and "hunter2" not in log
    assert KEY not in log
