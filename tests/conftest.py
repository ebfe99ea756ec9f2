"""Shared fixtures: a demo checkpoint on disk and real `sirocco serve` processes.

Servers are started as a user would start them (the `sirocco` console script, a free
port on 127.0.0.1, a temporary data dir) and stopped with SIGINT, like Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sirocco.models.demo import write_demo_model

SIROCCO = [sys.executable, "-m", "sirocco"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `sirocco serve` process."""

    url: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    args: list[str],
    data_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> Server:
    """Start `sirocco serve ARGS` on a free port and wait until /health answers 200."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [*SIROCCO, "serve", "--port", str(port), "--data-dir", str(data_dir), *args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sirocco serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"sirocco serve did not become healthy in {timeout}s:\n{server.log()}")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint, written once per test session."""
    return write_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def demo_server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One open server (no API key) with the demo checkpoint as mistral-tiny / codestral-latest."""
    server = start_server(
        [
            "--model",
            str(demo_model_dir),
            "--served-model-name",
            "mistral-tiny",
            "--served-model-name",
            "mistralai/mistral-tiny",
            "--served-model-name",
            "codestral-latest",
            "--dtype",
            "float32",
        ],
        tmp_path_factory.mktemp("demo-server-data"),
    )
    yield server
    server.stop()
