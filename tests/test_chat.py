"""Chat completions as the SDKs and curl see them (demo model: its text is meaningless)."""

from __future__ import annotations

import json

import httpx
import pytest
from mistralai.client import Mistral
from openai import OpenAI

from tests.conftest import Server

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture()
def mistral(demo_server: Server) -> Mistral:
    return Mistral(api_key="unused", server_url=demo_server.url)


@pytest.fixture()
def openai_client(demo_server: Server) -> OpenAI:
    return OpenAI(api_key="unused", base_url=demo_server.url + "/v1")


def post(server: Server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def sse_events(server: Server, body: dict) -> list[str]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def test_mistral_sdk_chat_complete(mistral: Mistral) -> None:
    res = mistral.chat.complete(model="mistral-tiny", messages=HELLO, max_tokens=5,
                                temperature=0)
    assert res.object == "chat.completion"
    assert res.choices[0].finish_reason == "length"
    assert isinstance(res.choices[0].message.content, str) and res.choices[0].message.content
    assert res.usage.completion_tokens == 5
    assert res.usage.total_tokens == res.usage.prompt_tokens + 5


def test_mistral_sdk_chat_stream_matches_complete(mistral: Mistral) -> None:
    args = dict(model="mistral-tiny", messages=HELLO, max_tokens=6, temperature=0)
    full = mistral.chat.complete(**args).choices[0].message.content
    streamed = ""
    finish = None
    for event in mistral.chat.stream(**args):
        choice = event.data.choices[0]
        streamed += choice.delta.content or ""
        finish = choice.finish_reason or finish
    assert streamed == full
    assert finish == "length"


def test_stream_wire_format(demo_server: Server) -> None:
    events = sse_events(demo_server, {"model": "mistral-tiny", "messages": HELLO,
                                      "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks[:-1]:
        assert "finish_reason" in c["choices"][0] and c["choices"][0]["finish_reason"] is None
        assert "usage" not in c
        assert c["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_stream_options_include_usage_sends_a_usage_chunk(openai_client: OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model="mistral-tiny", messages=HELLO, max_tokens=3, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_sdk_n_logprobs_and_seed(openai_client: OpenAI) -> None:
    args = dict(model="mistral-tiny", messages=HELLO, max_tokens=4, n=3, seed=7,
                temperature=1.0, logprobs=True, top_logprobs=2)
    a = openai_client.chat.completions.create(**args)
    b = openai_client.chat.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choices differ from each other
    tokens = a.choices[0].logprobs.content
    assert len(tokens) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert a.usage.completion_tokens == 12


def test_openai_sdk_stream_interleaves_choices(openai_client: OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model="mistral-tiny", messages=HELLO, max_tokens=3, n=2, stream=True)
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream
                if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_stop_string_is_not_returned(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    text = post(demo_server, body).json()["choices"][0]["message"]["content"]
    stop = text[3:6]
    res = post(demo_server, {**body, "stop": [stop]}).json()["choices"][0]
    assert res["finish_reason"] == "stop"
    assert res["message"]["content"] == text[: text.index(stop)]
    streamed = "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "")
        for e in sse_events(demo_server, {**body, "stop": stop, "stream": True})[:-1])
    assert streamed == text[: text.index(stop)]


def test_prefix_true_continues_the_assistant_message(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "max_tokens": 3, "temperature": 0,
            "messages": [*HELLO, {"role": "assistant", "content": "Sure", "prefix": True}]}
    r = post(demo_server, body)
    assert r.status_code == 200, r.text


def test_logit_bias_forces_a_token(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 3,
            "logit_bias": {"1000": 100}, "logprobs": True}
    tokens = post(demo_server, body).json()["choices"][0]["logprobs"]["content"]
    assert [t["token_id"] for t in tokens] == [1000, 1000, 1000]


@pytest.mark.parametrize("body, field", [
    ({"store": True}, "store"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
])
def test_invalid_fields_are_422_naming_the_field(demo_server: Server, body: dict,
                                                 field: str) -> None:
    r = post(demo_server, {"model": "mistral-tiny", "messages": HELLO, **body})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any(field in [str(p) for p in d["loc"]] for d in detail), detail


def test_unknown_model_is_400_invalid_model(demo_server: Server) -> None:
    r = post(demo_server, {"model": "mistral-large-latest", "messages": HELLO})
    assert r.status_code == 400
    assert r.json() == {"object": "error", "message": "Invalid model: mistral-large-latest",
                        "type": "invalid_model", "param": "model", "code": "1500"}


@pytest.mark.parametrize("body, words", [
    ({"max_tokens": 9000}, ["9000", "8192"]),
    ({"messages": [*HELLO, {"role": "assistant", "content": "x"}]}, ["ends with an assistant"]),
    ({"messages": [*HELLO, {"role": "tool", "content": "r", "tool_call_id": "abcdefghi"}]},
     ["abcdefghi"]),
    ({"guardrails": [{"block_on_error": True}]}, ["guardrails"]),
    ({"logit_bias": {"99999": 1}}, ["99999", "vocabulary"]),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "http://x/y.png"}]}]}, ["image_url", "text only"]),
])
def test_bad_requests_are_400_with_a_clear_message(demo_server: Server, body: dict,
                                                  words: list[str]) -> None:
    r = post(demo_server, {"model": "mistral-tiny", "messages": HELLO, **body})
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    for word in words:
        assert word in message


def test_n_above_the_server_maximum_is_422(demo_server: Server) -> None:
    r = post(demo_server, {"model": "mistral-tiny", "messages": HELLO, "n": 1000})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "n"]


def test_system_messages_anywhere_are_accepted(demo_server: Server) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "Hi"},
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"},
                {"role": "user", "content": "again"}]
    r = post(demo_server, {"model": "mistral-tiny", "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_tool_round_trip_is_encoded(mistral: Mistral) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "name": "get_weather", "content": "22C", "tool_call_id": "abcDEF123"},
    ]
    res = mistral.chat.complete(model="mistral-tiny", messages=messages, tools=tools,
                                max_tokens=3, temperature=0)
    assert res.choices[0].finish_reason in ("length", "stop", "tool_calls")


BOOK_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "year": {"type": "integer"},
        "genre": {"enum": ["novel", "poetry", "essay"]},
        "authors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                    "maxItems": 3},
    },
    "required": ["name", "year", "genre", "authors"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def test_twenty_seeded_json_schema_samples_all_validate(openai_client: OpenAI) -> None:
    import jsonschema

    choices = []
    for seed in (1, 100):
        res = openai_client.chat.completions.create(
            model="mistral-tiny", messages=[{"role": "user", "content": "A book as JSON"}],
            n=10, seed=seed, temperature=1.0, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {
                "name": "book", "schema": BOOK_SCHEMA, "strict": True}})
        choices += res.choices
    assert len({c.message.content for c in choices}) > 10
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), BOOK_SCHEMA)


def test_mistral_sdk_json_schema_streaming(mistral: Mistral) -> None:
    import jsonschema

    text = ""
    for event in mistral.chat.stream(
            model="mistral-tiny", messages=[{"role": "user", "content": "A book"}],
            max_tokens=200, random_seed=3,
            response_format={"type": "json_schema", "json_schema": {
                "name": "book", "schema": BOOK_SCHEMA, "strict": True}}):
        text += event.data.choices[0].delta.content or ""
    jsonschema.validate(json.loads(text), BOOK_SCHEMA)


def test_json_object_mode_gives_a_json_object(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 300, "random_seed": 5,
            "response_format": {"type": "json_object"}}
    choice = post(demo_server, body).json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a random model may still be writing at the cap
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_invalid_schema_is_400(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"},
                                               "strict": True}}}
    r = post(demo_server, body)
    assert r.status_code == 400
    assert r.json()["param"] == "response_format"


def test_tool_choice_any_forces_a_valid_call_round_trip(mistral: Mistral) -> None:
    import jsonschema

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    res = mistral.chat.complete(model="mistral-tiny", messages=messages, tools=[WEATHER_TOOL],
                                tool_choice="any", max_tokens=300, random_seed=1,
                                parallel_tool_calls=False)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false: one call
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert len(call.id) == 9 and call.id.isalnum()
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER_TOOL["function"]["parameters"])
    # The SDK sends the call back with the tool's result: the conversation goes on.
    messages += [choice.message, {"role": "tool", "name": "get_weather", "content": "22C",
                                  "tool_call_id": call.id}]
    follow = mistral.chat.complete(model="mistral-tiny", messages=messages,
                                   tools=[WEATHER_TOOL], max_tokens=3)
    assert follow.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_named_tool_choice_streams_the_call_whole(openai_client: OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model="mistral-tiny", messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL], max_tokens=300, stream=True, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [c.choices[0] for c in stream if c.choices]
    with_calls = [d for d in deltas if d.delta.tool_calls]
    assert len(with_calls) == 1
    call = with_calls[0].delta.tool_calls[0]
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_choice_none_never_calls(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "tools": [WEATHER_TOOL],
            "tool_choice": "none", "max_tokens": 20, "logit_bias": {"5": 100}}  # 5 = [TOOL_CALLS]
    choice = post(demo_server, body).json()["choices"][0]
    assert choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] != "tool_calls"


def test_min_tokens_with_structured_output_is_400(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "min_tokens": 5,
            "response_format": {"type": "json_object"}}
    assert post(demo_server, body).status_code == 400


def _demo_prompt(demo_model_dir, messages: list[dict]) -> list[int]:
    from sirocco.models.loader import inspect_checkpoint, load_tokenizer

    return load_tokenizer(inspect_checkpoint(demo_model_dir)).encode_chat(messages)


def test_mistral_sdk_prompt_logprobs(mistral: Mistral, demo_model_dir) -> None:
    prompt = _demo_prompt(demo_model_dir, HELLO)
    res = mistral.chat.complete(model="mistral-tiny", messages=HELLO, max_tokens=2, n=2,
                                temperature=1.0, prompt_logprobs=True, top_prompt_logprobs=2)
    assert res.usage.prompt_tokens == len(prompt)
    per_choice = []
    for choice in res.choices:
        entries = choice.prompt_logprobs.content
        # one entry per prompt token after the first (the first has no logprob)
        assert [e.token_id for e in entries] == prompt[1:]
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-5 for e in entries)
        assert all(bytes(e.bytes_).decode("utf-8", "replace") == e.token for e in entries)
        assert not choice.logprobs  # not asked for: absent (UNSET in the SDK)
        per_choice.append([round(e.logprob, 4) for e in entries])
    assert per_choice[0] == per_choice[1]  # the same prompt, the same logprobs


def test_mistral_sdk_stream_prompt_logprobs_on_the_first_chunk(mistral: Mistral,
                                                                demo_model_dir) -> None:
    prompt = _demo_prompt(demo_model_dir, HELLO)
    choices = [e.data.choices[0] for e in mistral.chat.stream(
        model="mistral-tiny", messages=HELLO, max_tokens=3, temperature=0,
        prompt_logprobs=True)]
    assert choices[0].delta.role == "assistant" and choices[0].delta.content == ""
    entries = choices[0].prompt_logprobs.content
    assert [e.token_id for e in entries] == prompt[1:]
    assert all(not e.top_logprobs for e in entries)  # top_prompt_logprobs defaults to 0
    assert not any(c.prompt_logprobs for c in choices[1:])  # absent: UNSET
    assert choices[-1].finish_reason == "length"


def test_top_prompt_logprobs_without_prompt_logprobs_is_400(demo_server: Server) -> None:
    body = {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 1,
            "top_prompt_logprobs": 2}
    r = post(demo_server, body)
    assert r.status_code == 400
    assert "prompt_logprobs" in r.json()["message"]
    plain = post(demo_server, {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 1})
    assert "prompt_logprobs" not in plain.json()["choices"][0]


def test_stream_n2_each_choice_opens_with_its_prompt_logprobs(demo_server: Server) -> None:
    events = sse_events(demo_server, {"model": "mistral-tiny", "messages": HELLO, "n": 2,
                                      "max_tokens": 2, "stream": True,
                                      "prompt_logprobs": True, "top_prompt_logprobs": 1})
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        entries = mine[0]["prompt_logprobs"]["content"]
        assert len(entries) == json.loads(events[-2])["usage"]["prompt_tokens"] - 1
        assert all(set(e) == {"token", "logprob", "bytes", "token_id", "top_logprobs"}
                   and len(e["top_logprobs"]) == 1 for e in entries)
        assert all("prompt_logprobs" not in c for c in mine[1:])
        assert mine[-1]["finish_reason"] == "length"


def test_parallel_tool_calls_false_keeps_one_call(demo_model_dir) -> None:
    """Parsing side: a generation holding two calls yields one when parallel calls are off."""
    from sirocco.models.loader import inspect_checkpoint, load_tokenizer
    from sirocco.serving.generation import _ChoiceText

    tok = load_tokenizer(inspect_checkpoint(demo_model_dir))
    body = tok.encode_text('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]')
    for parallel, names in ((True, ["a", "b"]), (False, ["a"])):
        text = _ChoiceText(tok, [], tools_enabled=True, parallel_tool_calls=parallel)
        text.push([tok.tool_calls_id, *body])
        _, calls = text.finish()
        assert [c.name for c in calls] == names
