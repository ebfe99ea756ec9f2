"""Security and exposure: what a client without a key, or a slow one, can make the server
do, and what the server lets out (health, logs, signed URLs)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from tests.conftest import Server, start_server

KEY = "security-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT_S = 2
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def guarded(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a key (from the environment) and small limits."""
    server = start_server(
        ["--model", str(demo_model_dir), "--served-model-name", "secret-model-id",
         "--dtype", "float32", "--kv-cache-memory", "16MiB",
         "--max-request-size", "1MiB", "--max-upload-size", "64KiB",
         "--read-timeout", str(READ_TIMEOUT_S), "--max-concurrent-uploads", "2"],
        tmp_path_factory.mktemp("guarded"),
        env={"SIROCCO_API_KEY": KEY},
    )
    yield server
    server.stop()


def rss_mib(server: Server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Body:
    """A body streamed in 1 MiB chunks, counting what the client managed to send."""

    def __init__(self, size: int) -> None:
        self.chunks = size // MiB
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"x" * MiB
        for _ in range(self.chunks):
            self.sent += 1
            yield chunk


def temp_files(server: Server) -> list[Path]:
    return list((server.data_dir / "files").glob(".tmp-*"))


def stalled_upload(server: Server, sent: int = 1000, declared: int = 60_000) -> socket.socket:
    """An upload that sends its headers and `sent` bytes of the file part, then nothing."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    part = (b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            b"\r\n" + b"y" * sent)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=BOUND\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    sock.sendall(head + part)
    return sock


def read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- 1. the key is checked, and the size limit applied, before the body is read ---------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_unauthenticated_300_mb_body_is_refused_unread(guarded: Server, declared: bool) -> None:
    body = Body(300 * MiB)
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(300 * MiB)
    before = rss_mib(guarded)
    started = time.monotonic()
    r = httpx.post(guarded.url + "/v1/chat/completions", content=body, headers=headers,
                   timeout=30)
    elapsed = time.monotonic() - started
    grown = rss_mib(guarded) - before
    print(f"300 MB unauthenticated: 401 in {elapsed * 1000:.0f} ms, {body.sent} MiB sent, "
          f"RSS {grown:+.1f} MiB")
    assert r.status_code == 401
    assert r.json() == {"detail": "Unauthorized"}
    assert elapsed < 1, elapsed
    assert body.sent < body.chunks  # the server closed the connection: the rest was never read
    assert grown < 4


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_authenticated_body_past_the_limit_is_413(guarded: Server, declared: bool) -> None:
    body = Body(50 * MiB)
    headers = {"Content-Type": "application/json", **AUTH}
    if declared:
        headers["Content-Length"] = str(50 * MiB)
    before = rss_mib(guarded)
    r = httpx.post(guarded.url + "/v1/chat/completions", content=body, headers=headers,
                   timeout=30)
    assert r.status_code == 413
    assert r.json()["code"] == "request_too_large"
    assert "--max-request-size" in r.json()["message"]
    assert body.sent < body.chunks
    assert rss_mib(guarded) - before < 4
    assert httpx.get(guarded.url + "/v1/models", headers=AUTH).status_code == 200


def test_body_just_under_the_limit_is_parsed(guarded: Server) -> None:
    r = httpx.post(guarded.url + "/v1/chat/completions", headers=AUTH,
                   json={"model": "secret-model-id", "max_tokens": 2,
                         "messages": [{"role": "user", "content": "x" * 1_000_000}]}, timeout=60)
    assert r.status_code == 400, r.text  # read and encoded: too long for the model, not a 413
    assert "context length" in r.json()["message"]


# -- 2. slow clients time out; concurrent uploads are bounded ----------------------------------


def test_stalled_upload_is_cut_off_and_leaves_no_temporary_file(guarded: Server) -> None:
    started = time.monotonic()
    sock = stalled_upload(guarded)
    deadline = time.monotonic() + 1
    while not temp_files(guarded) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(guarded), "the upload never reached the disk: the test proves nothing"
    with sock:
        answer = read_response(sock, timeout=READ_TIMEOUT_S + 5)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 2, elapsed
    assert temp_files(guarded) == []


def test_uploads_past_the_bound_are_429_with_retry_after(guarded: Server) -> None:
    socks = [stalled_upload(guarded) for _ in range(2)]
    try:
        time.sleep(0.3)
        r = httpx.post(guarded.url + "/v1/files", headers=AUTH,
                       files={"file": ("a.jsonl", b'{"text": "hi"}\n')})
        assert r.status_code == 429
        assert r.json()["code"] == "too_many_uploads"
        assert int(r.headers["Retry-After"]) > 0
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the closed uploads end; then the slot is free again
        r = httpx.post(guarded.url + "/v1/files", headers=AUTH,
                       files={"file": ("a.jsonl", b'{"text": "hi"}\n')})
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert temp_files(guarded) == []


def test_a_stalled_json_body_is_cut_off(guarded: Server) -> None:
    """Not only uploads: a chat request whose body stops half-way is a 408 at the timeout."""
    port = int(guarded.url.rsplit(":", 1)[1])
    part = b'{"model": "secret-model-id", "messages": [{"role": "user", "content": "hel'
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(part) + 100}\r\n\r\n".encode() + part)
        answer = read_response(sock, timeout=READ_TIMEOUT_S + 5)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 2, elapsed


def test_a_slow_but_steady_body_is_not_cut_off(guarded: Server) -> None:
    def trickle() -> Iterator[bytes]:
        payload = b'{"model": "secret-model-id", "max_tokens": 1, "messages": [{"role": "user", ' \
                  b'"content": "hello"}]}'
        for i in range(0, len(payload), 20):  # a chunk every second, each within the timeout
            yield payload[i:i + 20]
            time.sleep(READ_TIMEOUT_S / 2)

    r = httpx.post(guarded.url + "/v1/chat/completions", content=trickle(),
                   headers={"Content-Type": "application/json", **AUTH}, timeout=60)
    assert r.status_code == 200, r.text


# -- 6. error bodies stay JSON whatever the input (with the key on) ---------------------------


@pytest.mark.parametrize("raw", [
    b'{"model": "secret-model-id", "temperature": NaN, "messages": [{"role": "user", '
    b'"content": "hi"}]}',
    b'{"model": "secret-model-id", "top_p": -Infinity, "messages": [{"role": "user", '
    b'"content": "hi"}]}',
    b'{"model": "secret-model-id", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "secret-model-id", "temperature": "\\udfff", "messages": [{"role": "user", '
    b'"content": "hi"}]}',
], ids=["nan", "infinity", "surrogate-in-content", "surrogate-as-temperature"])
def test_nan_and_lone_surrogates_are_a_422_whose_body_is_json(guarded: Server, raw: bytes) -> None:
    r = httpx.post(guarded.url + "/v1/chat/completions", content=raw, timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text

    def refuse(constant: str) -> None:
        raise AssertionError(f"the error body holds {constant}")

    detail = json.loads(r.content.decode("utf-8"), parse_constant=refuse)["detail"]
    assert detail and all(d["loc"][0] == "body" for d in detail)


# -- 3. /health tells an unauthenticated client only the status --------------------------------


def test_health_without_a_key_shows_only_the_status(guarded: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(guarded.url + "/health", headers=headers)
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}
        assert "secret-model-id" not in r.text


def test_health_with_the_key_lists_the_models(guarded: Server) -> None:
    r = httpx.get(guarded.url + "/health", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert "secret-model-id" in r.json()["models"]


# -- 4. no secret in any log line; 5. signed URLs ignore the Host header ----------------------


def _uploaded_file(server: Server) -> str:
    r = httpx.post(server.url + "/v1/files", headers=AUTH,
                   files={"file": ("logged.jsonl", b'{"text": "log me"}\n')})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_signatures_and_query_keys_never_reach_the_log(guarded: Server) -> None:
    file_id = _uploaded_file(guarded)
    url = httpx.get(f"{guarded.url}/v1/files/{file_id}/url", headers=AUTH).json()["url"]
    signature = httpx.URL(url).params["signature"]
    assert httpx.get(url).content == b'{"text": "log me"}\n'
    assert httpx.get(url.replace(signature, "0" * 64)).status_code == 403
    query_secret = "query-string-secret-4711"
    for query in (f"api_key={query_secret}", f"key={query_secret}&x=1", f"token={query_secret}"):
        httpx.get(f"{guarded.url}/v1/models?{query}", headers=AUTH)
        httpx.get(f"{guarded.url}/health?{query}")
    time.sleep(0.5)  # the access log is written as the answers go out
    log = guarded.log()
    assert f"/signed/files/{file_id}" in log  # the requests were logged...
    assert "signature=[redacted]" in log and "api_key=[redacted]" in log
    assert signature not in log  # ...without their secrets
    assert query_secret not in log
    assert KEY not in log


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.1:1"])
def test_a_forged_host_header_does_not_change_the_signed_url(guarded: Server, host: str) -> None:
    file_id = _uploaded_file(guarded)
    r = httpx.get(f"{guarded.url}/v1/files/{file_id}/url", headers={**AUTH, "Host": host})
    assert r.status_code == 200
    url = r.json()["url"]
    assert url.startswith(f"{guarded.url}/signed/files/{file_id}?"), url
    assert httpx.get(url).status_code == 200


# -- 5/6. --public-url; keys from a file; a warning for a key on the command line --------------


@pytest.fixture(scope="module")
def keyfile_server(demo_model_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("keyfile")
    key_file = data_dir / "keys.txt"
    key_file.write_text("# one key a line\nfile-key-1\n\n  file-key-2  \n")
    server = start_server(
        ["--model", str(demo_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
         "--api-key", "argv-key", "--api-key-file", str(key_file),
         "--public-url", "https://files.example.com/sirocco/"],
        data_dir,
    )
    yield server
    server.stop()


def test_keys_from_the_file_and_the_flag_are_accepted(keyfile_server: Server) -> None:
    for key in ("file-key-1", "file-key-2", "argv-key"):
        r = httpx.get(keyfile_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, key
    for key in ("#", "file-key", "file-key-1x"):
        r = httpx.get(keyfile_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401, key


def test_a_key_on_the_command_line_is_warned_about(keyfile_server: Server,
                                                   guarded: Server) -> None:
    assert "every local user can read it" not in guarded.log()  # it came from SIROCCO_API_KEY
    assert "every local user can read it in `ps`" in keyfile_server.log()
    assert "file-key-1" not in keyfile_server.log()


def test_signed_urls_use_the_public_url(keyfile_server: Server) -> None:
    headers = {"Authorization": "Bearer file-key-1"}
    r = httpx.post(keyfile_server.url + "/v1/files", headers=headers,
                   files={"file": ("p.jsonl", b'{"text": "public"}\n')})
    file_id = r.json()["id"]
    url = httpx.get(f"{keyfile_server.url}/v1/files/{file_id}/url",
                    headers={**headers, "Host": "evil.example"}).json()["url"]
    assert url.startswith(f"https://files.example.com/sirocco/signed/files/{file_id}?"), url
    local = httpx.URL(url).copy_with(scheme="http", host="127.0.0.1",
                                     port=httpx.URL(keyfile_server.url).port,
                                     path=f"/signed/files/{file_id}")
    assert httpx.get(local).content == b'{"text": "public"}\n'


def test_key_file_settings(tmp_path: Path) -> None:
    from sirocco.cli import build_parser
    from sirocco.config import settings_from_args

    key_file = tmp_path / "keys"
    key_file.write_text("k-file\n")
    args = build_parser().parse_args(["serve"])
    settings = settings_from_args(args, {"SIROCCO_API_KEY": "k-env",
                                         "SIROCCO_API_KEY_FILE": str(key_file)})
    assert settings.api_keys == ["k-env", "k-file"]
    assert not settings.api_key_on_command_line
    args = build_parser().parse_args(["serve", "--api-key", "k-argv"])
    assert settings_from_args(args, {}).api_key_on_command_line
    args = build_parser().parse_args(["serve", "--api-key-file", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="cannot read the API key file"):
        settings_from_args(args, {})
    (tmp_path / "empty").write_text("# nothing\n")
    args = build_parser().parse_args(["serve", "--api-key-file", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="holds no key"):
        settings_from_args(args, {})
    args = build_parser().parse_args(["serve", "--read-timeout", "0"])
    with pytest.raises(SystemExit, match="--read-timeout must be positive"):
        settings_from_args(args, {})


# -- 3. /health reports a dead engine -----------------------------------------------------------


def test_health_is_503_and_names_a_dead_engine(demo_model_dir: Path, tmp_path: Path) -> None:
    """In-process with the engine in a thread, so that the test can make one engine's step
    raise as a bug would."""
    import threading

    import uvicorn

    from sirocco.api.app import create_app
    from sirocco.api.state import ServerState
    from sirocco.cli import build_parser
    from sirocco.config import settings_from_args
    from sirocco.serving.loading import load_models
    from tests.conftest import free_port

    port = free_port()
    args = build_parser().parse_args([
        "serve", "--model", str(demo_model_dir), "--served-model-name", "doomed-model",
        "--engine", "thread",
        "--dtype", "float32", "--kv-cache-memory", "16MiB", "--port", str(port),
        "--data-dir", str(tmp_path)])
    settings = settings_from_args(args, {"SIROCCO_API_KEY": KEY})
    registry = load_models(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(ServerState(settings, registry)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert httpx.get(url + "/health").json() == {"status": "ok"}

        def broken_step() -> None:
            raise RuntimeError("a bug in the engine loop")

        registry.get("doomed-model").engine.engine.step = broken_step
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                       json={"model": "doomed-model", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (500, 503)  # the request caught in the dying step

        r = httpx.get(url + "/health")
        assert r.status_code == 503
        assert r.json() == {"status": "unavailable"}
        r = httpx.get(url + "/health", headers=AUTH)
        assert r.status_code == 503
        assert r.json()["unavailable_models"] == ["doomed-model"]
        assert "mistral-embed" in r.json()["models"]
    finally:
        server.should_exit = True
        thread.join(30)


def engine_processes(server: Server) -> list:
    """The server's engine processes (spawned by multiprocessing), as psutil processes."""
    import psutil

    return [c for c in psutil.Process(server.process.pid).children()
            if "spawn_main" in " ".join(c.cmdline())]


def test_a_killed_engine_process_fails_its_streams_at_once_then_503(
        demo_model_dir: Path, tmp_path: Path) -> None:
    """The engine process dies mid-stream (the OOM killer, a crash in native code): the
    stream ends with finish_reason "error", new requests get a 503, /health says which
    model, and the server itself stays up and stops cleanly."""

    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "doomed",
                           "--dtype", "float32", "--kv-cache-memory", "16MiB"],
                          tmp_path, env={"SIROCCO_API_KEY": KEY})
    try:
        engines = engine_processes(server)
        assert len(engines) == 1  # one engine process for the one generative model
        request = {"model": "doomed", "stream": True, "max_tokens": 2000, "min_tokens": 1900,
                   "messages": [{"role": "user", "content": "hi"}]}
        finishes, comments = [], []
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                          json=request, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if not finishes and chunk["choices"][0]["delta"].get("content"):
                        engines[0].kill()
                    finishes += [c["finish_reason"] for c in chunk["choices"]
                                 if c["finish_reason"]]
                elif line.startswith(": error"):
                    comments.append(line)
        assert finishes == ["error"]
        assert "engine process exited" in comments[0]

        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                       json={**request, "stream": False, "max_tokens": 2, "min_tokens": 0})
        assert r.status_code == 503
        assert "doomed" in r.json()["message"]
        r = httpx.get(server.url + "/health", headers=AUTH)
        assert r.status_code == 503 and r.json()["unavailable_models"] == ["doomed"]
        assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    finally:
        assert server.stop() == 0


def test_an_engine_process_never_outlives_its_server(demo_model_dir: Path,
                                                    tmp_path: Path) -> None:
    """Even a server killed outright (no shutdown) leaves no engine process behind."""
    import psutil

    server = start_server(["--model", str(demo_model_dir), "--dtype", "float32",
                           "--kv-cache-memory", "16MiB"], tmp_path)
    engines = engine_processes(server)
    assert len(engines) == 1
    server.process.kill()
    server.process.wait()
    _, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive


# -- request ids -------------------------------------------------------------------------------


def test_every_answer_carries_a_request_id(guarded: Server) -> None:
    r = httpx.get(guarded.url + "/v1/models", headers={**AUTH, "x-request-id": "client-id.42"})
    assert r.headers["x-request-id"] == "client-id.42"
    for bad in ("", "x" * 129, "spaces are not sane", "semi;colon"):
        r = httpx.get(guarded.url + "/v1/models", headers={"x-request-id": bad})
        assert r.status_code == 401  # refusals carry one too
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
    ids = {httpx.get(guarded.url + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_the_request_id_is_in_request_state() -> None:
    import asyncio

    from sirocco.api.request_id import RequestId

    app = FastAPI()
    app.add_middleware(RequestId)

    @app.get("/")
    async def root(request: Request) -> dict:
        return {"seen": request.state.request_id}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/", headers={"x-request-id": "abc-1"})

    r = asyncio.run(call())
    assert r.json() == {"seen": "abc-1"}
    assert r.headers["x-request-id"] == "abc-1"
