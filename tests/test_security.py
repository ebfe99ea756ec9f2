"""Security and exposure: what a client without a key, or a slow one, can make the server
do, and what the server lets out (health, logs, signed URLs)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
    assert r.status_code == 401
    assert r.json() == {"detail": "Unauthorized"}
    assert elapsed < 1, elapsed
    assert body.sent < body.chunks  # the server closed the connection: the rest was never read
    assert rss_mib(guarded) - before < 4


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
