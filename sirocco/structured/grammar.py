"""Grammars for structured output and forced tool calls, in llguidance's Lark dialect.

Each function returns the grammar's text; nothing here touches a vocabulary, so a bad
schema or tool list is refused with `InvalidSchema` before any model work. The grammar
is compiled against the model's vocabulary in `constraints.py`, which also reports the
schema errors only the compiler finds (an unknown type, a dangling `$ref`, ...).

Layout choices that make outputs look like what models were trained on:

* JSON may start after up to 4 whitespace characters (SentencePiece tokens usually
  begin with a space) and, between its tokens, holds at most 20 whitespace characters
  (one newline and an indentation), so a model cannot loop on whitespace forever;
* the arguments of a forced tool call are compact: spaced as `json.dumps` spaces them
  (`", "` and `": "`, like the rest of the call) with no free whitespace, which small
  models fill instead of closing the object;
* end-of-sequence is allowed after each complete call; Hermes calls may also end with
  one or two newlines after which only end-of-sequence may come (a model that writes
  a blank line after its last call has finished, not begun another call);
* tool calls are spelled exactly as each tokenizer's own encoding writes them:
  `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]` up to v7 (json.dumps spacing,
  each call optionally ending with the `"id"` mistral-common writes),
  `[TOOL_CALLS]f[ARGS]{...}` repeated per call from v11 (optionally `[CALL_ID]id` before
  `[ARGS]`), and Hermes
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` blocks, one per line,
  for every other model.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sirocco.tokenizers.base import Tokenizer

JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"
"""Whitespace allowed between two JSON tokens."""

_LEADING_WHITESPACE = "WS: /[ \\t\\r\\n]{1,4}/"
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class InvalidSchema(ValueError):
    """A JSON schema or tool list no grammar can be built from; the message is user-facing."""


def json_schema_grammar(schema: Any, strict: bool) -> str:
    """Any JSON document that validates against `schema`.

    With `strict`, a keyword the grammar compiler cannot enforce is an error; without, it
    is ignored (the output then validates against the rest of the schema).
    """
    return f"start: WS? {_json_rule(schema, strict, 'the JSON schema')}\n{_LEADING_WHITESPACE}\n"


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `json_object` response format)."""
    return json_schema_grammar({"type": "object"}, strict=False)


def tool_call_grammar(tools: list[dict[str, Any]], choice: str, parallel: bool,
                      tokenizer: Tokenizer, special_ids: dict[bytes, int] | None = None) -> str:
    """One or more calls (several only with `parallel`) of the tools `choice` allows.

    `choice` is "any" (or "required") for any of `tools`, or a function's name. The
    arguments of each call validate against that function's `parameters`. For a Hugging
    Face tokenizer, `special_ids` maps special tokens' text to ids: `<tool_call>` and
    `</tool_call>` are forced as those tokens where the vocabulary has them.
    """
    functions = _functions(tools)
    if choice not in ("any", "required"):
        if choice not in functions:
            known = ", ".join(sorted(functions)) or "none"
            raise InvalidSchema(
                f"tool_choice names the function {choice!r}, which is not among the tools "
                f"({known})"
            )
        functions = {choice: functions[choice]}
    tool_calls_id = getattr(tokenizer, "tool_calls_id", None)
    if hasattr(tokenizer, "tool_calls_id") and tool_calls_id is None:
        raise InvalidSchema("this model's tokenizer has no [TOOL_CALLS] token, so it cannot call "
                            "tools")
    lines: list[str] = []
    if tool_calls_id is None:
        lines += _hermes_calls(functions, parallel, special_ids or {})
    elif getattr(tokenizer, "version", 0) >= 11 and getattr(tokenizer, "args_id", None) is not None:
        call_id = getattr(tokenizer, "call_id_id", None)
        lines += _name_args_calls(functions, parallel, tool_calls_id, tokenizer.args_id, call_id)
    else:
        lines += _json_list_calls(functions, parallel, tool_calls_id)
    return "\n".join([*lines, _LEADING_WHITESPACE, ""])


def text_without_grammar(forbidden: str) -> str:
    """Free text that never contains `forbidden` (a Hermes `<tool_call>` written as text)."""
    escaped = re.escape(forbidden).replace("/", "\\/")
    return f"start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*{escaped}.*)/\n"


def _json_list_calls(functions: dict[str, str], parallel: bool, tool_calls_id: int) -> list[str]:
    # [TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "a1b2c3d4e"}, {...}]: the id is
    # optional (mistral-common writes it in past calls; models often leave it out).
    more = ' (", " call)*' if parallel else ""
    lines = [
        f'start: <[{tool_calls_id}]> WS? "[" call{more} "]"',
        _alternatives("call", functions),
        'call_id: ", \\"id\\": \\"" /[a-zA-Z0-9]{9}/ "\\""',
    ]
    for index, (name, arguments) in enumerate(functions.items()):
        head = json.dumps(f'{{"name": "{name}", "arguments": ')
        lines.append(f'call_{index}: {head} {arguments} call_id? "}}"')
    return lines


def _name_args_calls(functions: dict[str, str], parallel: bool, tool_calls_id: int,
                     args_id: int, call_id_id: int | None) -> list[str]:
    # [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}, each name optionally followed by
    # [CALL_ID]a1b2c3d4e where the tokenizer has that token (mistral-common writes it).
    call_id = f" (<[{call_id_id}]> /[a-zA-Z0-9]{{9}}/)?" if call_id_id is not None else ""
    lines = [f"start: call{'+' if parallel else ''}", _alternatives("call", functions)]
    for index, (name, arguments) in enumerate(functions.items()):
        lines.append(
            f'call_{index}: <[{tool_calls_id}]> "{name}"{call_id} <[{args_id}]> {arguments}'
        )
    return lines


def _hermes_calls(functions: dict[str, str], parallel: bool,
                  special_ids: dict[bytes, int]) -> list[str]:
    # <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, one block per line
    opening, closing = (
        f"<[{special_ids[tag]}]>" if tag in special_ids else json.dumps(tag.decode())
        for tag in (b"<tool_call>", b"</tool_call>")
    )
    more = ' ("\\n" call)*' if parallel else ""
    lines = [
        f'start: call{more} ("\\n" "\\n"?)?',
        f'call: {opening} "\\n" body "\\n" {closing}',
        _alternatives("body", functions),
    ]
    for index, (name, arguments) in enumerate(functions.items()):
        head = json.dumps(f'{{"name": "{name}", "arguments": ')
        lines.append(f'body_{index}: {head} {arguments} "}}"')
    return lines


def _alternatives(rule: str, functions: dict[str, str]) -> str:
    return f"{rule}: " + " | ".join(f"{rule}_{i}" for i in range(len(functions)))


def _functions(tools: list[dict[str, Any]]) -> dict[str, str]:
    """Function name -> the `%json` rule of its arguments, from wire-shaped tools."""
    if not tools:
        raise InvalidSchema("a tool call can only be forced when tools are given")
    functions: dict[str, str] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise InvalidSchema(f"{where}.function is missing")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidSchema(
                f"{where}.function.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
            )
        if name in functions:
            raise InvalidSchema(f"{where}.function.name {name!r} is used by two tools")
        parameters = function.get("parameters")
        if parameters is None:  # no parameters: the function takes none
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        strict = bool(function.get("strict", False))
        functions[name] = _json_rule(parameters, strict, f"{where}.function.parameters",
                                     compact=True)
    return functions


def _json_rule(schema: Any, strict: bool, what: str, compact: bool = False) -> str:
    """`%json {...}`: the schema inline, with the JSON layout options llguidance reads.
    `compact`: json.dumps spacing and no other whitespace (else bounded free whitespace)."""
    if not isinstance(schema, dict):
        raise InvalidSchema(f"{what} must be a JSON object, not {type(schema).__name__}")
    options: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}
    if compact:
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                   "lenient": not strict}
    try:
        text = json.dumps({**schema, "x-guidance": options}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSchema(f"{what} is not valid JSON: {exc}") from exc
    return f"%json {text}"
