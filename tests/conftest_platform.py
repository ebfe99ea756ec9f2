"""Helpers for the platform tests (files, fine-tuning jobs, storage): a server that trains
with the fast fake trainer, an authenticated HTTP client, and the contract's response
schemas for `jsonschema`.

The schemas in `data/mistral_platform_schemas.json` are copied (with everything they
reference) from the official specs in ../shared/reference, changed only where YAML 1.1
reads a bound such as `1e-08` as a string; `test_storage.py` checks that they still match
when the specs are at hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import Server, start_server

TESTS_DIR = Path(__file__).resolve().parent
SCHEMAS_PATH = TESTS_DIR / "data" / "mistral_platform_schemas.json"
API_KEY = "platform-test-key"
#: Seconds the fake trainer spends on one step (so jobs can be cancelled mid-run).
FAKE_STEP_S = 0.05

_SCHEMAS = json.loads(SCHEMAS_PATH.read_text())


def assert_schema(group: str, name: str, body: Any) -> Any:
    """Validate `body` against the spec's `components/schemas/<name>` ("files" or
    "fine_tuning" spec); returns the body."""
    schema = {"$ref": f"#/components/schemas/{name}", **_SCHEMAS[group]}
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)
    return body


def platform_args(model_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", "mistral-tiny",
            "--dtype", "float32", "--api-key", API_KEY, "--max-upload-size", "64KiB",
            "--kv-cache-memory", "16MiB", *extra]


def platform_env() -> dict[str, str]:
    """The fake trainer, and W&B runs kept on disk (no network here)."""
    return {"SIROCCO_FINETUNE_TRAINER": "fake_trainer:train", "PYTHONPATH": str(TESTS_DIR),
            "FAKE_TRAINER_STEP_S": str(FAKE_STEP_S), "WANDB_MODE": "offline"}


def start_platform_server(model_dir: Path, data_dir: Path) -> Server:
    """`sirocco serve` with the demo model as mistral-tiny, an API key, a 64 KiB upload
    limit and the fake trainer."""
    return start_server(platform_args(model_dir), data_dir, env=platform_env())


def client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30,
                        headers={"Authorization": f"Bearer {API_KEY}"})


_SHARED: dict[str, Server] = {}


@pytest.fixture(scope="session")
def platform_server(demo_model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One platform server for the session: each test module that imports this fixture
    gets its own copy of it, so the server itself is shared through `_SHARED`."""
    owner = "server" not in _SHARED
    if owner:
        _SHARED["server"] = start_platform_server(demo_model_dir,
                                                  tmp_path_factory.mktemp("platform-data"))
    yield _SHARED["server"]
    if owner:
        _SHARED.pop("server").stop()


@pytest.fixture()
def api(platform_server: Server) -> Iterator[httpx.Client]:
    with client(platform_server) as c:
        yield c


def chat_jsonl(n: int = 20, tag: str = "") -> bytes:
    """`n` question/answer chats with made-up answers, one JSON object per line."""
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"What is the secret word number {i}{tag}?"},
        {"role": "assistant", "content": f"The secret word is zebra-{i}{tag}."},
    ]}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def upload(api: httpx.Client, content: bytes, name: str = "train.jsonl",
           purpose: str = "fine-tune") -> dict[str, Any]:
    r = api.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last value {value!r})")
        time.sleep(interval)
