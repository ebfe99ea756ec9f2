"""Ranges and caps of the request fields: one place, so that the 422s, the README's
"Limits" table and the code that trusts them agree.

Every integer a client sends has a range that the engine, torch and SQLite (int64)
can hold, every float is finite, and every list, map and schema a client sends has a
size that the server can afford to look at. A value outside answers a 422 in the
contract's shape naming the field, before any model, tensor or database sees it.
Checks that need the model (vocabulary, context length) or the server's flags
(`--max-n`) stay in the service.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any
from urllib.parse import unquote

from pydantic import Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: Counts of tokens, choices, dimensions, `top_k`, ...: above anything a model has.
COUNT_MAX = INT32_MAX

#: `random_seed` (Mistral: >= 0) and `seed` (OpenAI: any int64). Choice i of `n` uses
#: seed + i, which `torch.Generator.manual_seed` takes up to 2^64 - 1.
SEED_MAX = INT64_MAX

#: Stop strings per request, and characters in each.
STOP_MAX_COUNT = 64
STOP_MAX_CHARS = 1024

#: `logit_bias`: entries per request (the engine indexes the logits with them on every
#: step) and the range of each bias, OpenAI's.
LOGIT_BIAS_MAX_ENTRIES = 1024
LOGIT_BIAS_MAX = 100

#: Tools per request (OpenAI's cap).
TOOLS_MAX = 128

#: Chat messages per request: more than any conversation that fits a context (each
#: message costs a few tokens of template), few enough to validate in a moment.
CHAT_MAX_MESSAGES = 10_000
#: Characters of text for the model: a FIM `prompt` and `suffix` each, and a chat
#: request's messages in all. Above the largest Mistral context (256k tokens, about a
#: million characters), and a bound on the tokenizer's work (2M characters: ~4 s).
PROMPT_MAX_CHARS = 2_000_000

#: A JSON schema (`response_format.json_schema.schema`, a tool's `parameters`): its size
#: in bytes of compact JSON, and its depth in nested objects and arrays, with local
#: `$ref`s followed (a `$ref` counts as the schema it points to). The grammar compiler
#: recurses along that depth: a 1,000-deep `$ref` chain overflowed its stack and killed
#: the process. Real schemas stay far below 64 (a pydantic model nested 20 deep is ~45).
SCHEMA_MAX_BYTES = 64 * 1024
SCHEMA_MAX_DEPTH = 64
#: Schema nodes visited by the depth check, `$ref`s expanded: a bound on its own work.
SCHEMA_MAX_VISITS = 100_000

#: Items (values in its lists and objects) of a JSON request body, in all. Python's JSON
#: parser and pydantic hold the interpreter for the whole of one body: a `logit_bias` of
#: 10^6 entries (13 MB) blocked every other request for 2-4 s before its 422. A body past
#: this many items is refused before it is parsed; the largest valid requests (10,000
#: messages with tool calls, 128 tools) hold far fewer.
JSON_MAX_ITEMS = 100_000
#: Content chunks (text, images, ...) of a chat request's messages, in all.
CHAT_MAX_CONTENT_CHUNKS = 10_000

#: Embeddings: inputs per request (Mistral's own API answers "Too many inputs in
#: request" above 256; 512 is what LangChain batches), characters per input and in all.
EMBEDDING_MAX_INPUTS = 512
EMBEDDING_INPUT_MAX_CHARS = 100_000
EMBEDDING_MAX_TOTAL_CHARS = 4_000_000

#: List endpoints: `page_size` and `page`, chosen so that the offset page * page_size
#: fits SQLite's int64.
PAGE_SIZE_MAX = 10_000
PAGE_MAX = INT64_MAX // PAGE_SIZE_MAX

#: `expiry` of an upload, in hours (100 years; no expiry: leave it out).
UPLOAD_EXPIRY_MAX_HOURS = 24 * 365 * 100
#: `expiry` of a signed URL, in hours (the contract's 1 to 168).
SIGNED_URL_EXPIRY_MAX_HOURS = 168

#: Fine-tuning hyperparameters and weights.
TRAINING_STEPS_MAX = 1_000_000
EPOCHS_MAX = 1_000
SEQ_LEN_MAX = 1_048_576
FILE_WEIGHT_MAX = 1_000_000

# -- reusable field types --------------------------------------------------------------------

Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]
PositiveCount = Annotated[int, Field(ge=1, le=COUNT_MAX)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
PromptText = Annotated[str, Field(max_length=PROMPT_MAX_CHARS)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
StopString = Annotated[str, Field(max_length=STOP_MAX_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=STOP_MAX_COUNT)]
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_MAX, le=LOGIT_BIAS_MAX)]],
    Field(max_length=LOGIT_BIAS_MAX_ENTRIES),
]

# -- JSON schemas ------------------------------------------------------------------------------


class SchemaTooLarge(ValueError):
    """A schema past `SCHEMA_MAX_BYTES`, `SCHEMA_MAX_DEPTH` or `SCHEMA_MAX_VISITS`."""


def check_schema(schema: Any) -> None:
    """Raise `SchemaTooLarge` (a `ValueError`, so pydantic answers a 422) for a schema
    nested deeper than `SCHEMA_MAX_DEPTH` (local `$ref`s followed) or bigger than
    `SCHEMA_MAX_BYTES`; raise `ValueError` for one that holds NaN or an infinity.

    The depth comes first: it bounds the recursion of the size check (`json.dumps`).
    """
    schema_depth(schema)
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False))
    except ValueError:
        raise ValueError("the schema holds NaN or an infinity, which JSON cannot") from None
    if size > SCHEMA_MAX_BYTES:
        raise SchemaTooLarge(
            f"the schema is {size} bytes of JSON, above the limit of {SCHEMA_MAX_BYTES}")


def schema_depth(schema: Any, limit: int = SCHEMA_MAX_DEPTH) -> int:
    """The nesting depth of `schema` (objects and arrays), each local `$ref` counted as
    the schema it points to; `SchemaTooLarge` as soon as it passes `limit`.

    A `$ref` back to a schema that is being expanded (a recursive schema such as a tree)
    adds nothing: the compiler turns it into a recursive rule, not a deeper one. A
    target's depth is kept once known, so shared definitions are walked once.
    """
    known: dict[str, int] = {}
    expanding: set[str] = set()
    visits = 0

    def walk(node: Any, level: int) -> tuple[int, bool]:
        """(depth of node, whether a recursive `$ref` was cut inside it)."""
        nonlocal visits
        visits += 1
        if visits > SCHEMA_MAX_VISITS:
            raise SchemaTooLarge(
                f"the schema takes more than {SCHEMA_MAX_VISITS} steps to walk "
                "($refs expanded); simplify it")
        if level > limit:
            raise SchemaTooLarge(
                f"the schema is nested more than {limit} levels deep ($refs followed)")
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return 0, False
        depth, cut = 1, False
        for child in children:
            d, c = walk(child, level + 1)
            depth, cut = max(depth, 1 + d), cut or c
        ref = node.get("$ref") if isinstance(node, dict) else None
        if isinstance(ref, str) and ref.startswith("#"):
            d, c = follow(ref, level)
            depth, cut = max(depth, d), cut or c
        return depth, cut

    def follow(ref: str, level: int) -> tuple[int, bool]:
        if ref in expanding:
            return 0, True
        if ref in known:
            if level + known[ref] > limit:
                raise SchemaTooLarge(
                    f"the schema is nested more than {limit} levels deep ($refs followed)")
            return known[ref], False
        target = resolve_pointer(schema, ref)
        if target is None:
            return 0, False  # dangling: the grammar compiler names it
        expanding.add(ref)
        try:
            depth, cut = walk(target, level)
        finally:
            expanding.discard(ref)
        if not cut:  # a depth found with a recursion cut depends on the way in
            known[ref] = depth
        return depth, cut

    return walk(schema, 1)[0]


def resolve_pointer(document: Any, ref: str) -> Any:
    """The node a local `$ref` ("#", "#/$defs/a", "#/properties/x~1y") points to, or None."""
    pointer = unquote(ref[1:])
    if not pointer:
        return document
    if not pointer.startswith("/"):
        return None  # an anchor ("#foo"): left to the compiler
    node = document
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# -- the size of a JSON body -----------------------------------------------------------------

#: A JSON string (escapes skipped over) or a bracket or comma outside strings.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def json_items_at_most(raw: bytes) -> int:
    """An upper bound of the items in the JSON text `raw`, at C speed: its commas and
    opening brackets, those inside strings included."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def json_items(raw: bytes) -> dict[str | None, tuple[int, int]]:
    """The items of the JSON text `raw` by top-level field: for each key of the top-level
    object (None for what is not under one), its items in all and those of its own list
    or object. Strings are skipped whole, so commas in text do not count.

    A loop of small steps, each a short regex match: run in a thread, it lets the
    interpreter switch to the event loop between two (`json.loads` would not).
    """
    counts: dict[str | None, list[int]] = {}
    here = counts.setdefault(None, [0, 0])
    depth, expect_key = 0, False
    for match in _JSON_TOKEN.finditer(raw):
        token = match.group()
        char = token[0]
        if char == 0x22:  # a string
            if expect_key:
                try:
                    key = json.loads(token)
                except ValueError:
                    key = token[1:-1].decode("utf-8", "replace")
                here = counts.setdefault(str(key), [0, 0])
                expect_key = False
            continue
        if char in b"[{":
            depth += 1
            if depth == 1:
                expect_key = char == 0x7B
                continue
            here[0] += 1
            if depth == 2:
                here[1] += 1
        elif char in b"]}":
            depth -= 1
            if depth == 0:
                here = counts[None]
        elif depth == 1:  # a comma between two top-level fields
            expect_key = True
        else:
            here[0] += 1
            if depth == 2:
                here[1] += 1
    return {key: (total, own) for key, (total, own) in counts.items() if total}


#: Fields with a cap of their own on their items, named when a body past
#: `JSON_MAX_ITEMS` holds most of its items in one of them.
FIELD_MAX_ITEMS = {"messages": CHAT_MAX_MESSAGES, "logit_bias": LOGIT_BIAS_MAX_ENTRIES,
                   "stop": STOP_MAX_COUNT, "tools": TOOLS_MAX, "input": EMBEDDING_MAX_INPUTS}


def too_many_items(raw: bytes) -> dict[str, Any] | None:
    """None for a body within `JSON_MAX_ITEMS`, else a validation error (FastAPI's shape)
    naming the top-level field that holds the most items. CPU work of up to a few seconds
    for a hostile body: call it in a thread."""
    counts = json_items(raw)
    if sum(total for total, _ in counts.values()) <= JSON_MAX_ITEMS:
        return None
    field = max(counts, key=lambda k: counts[k][0])
    total, own = counts[field]
    loc: list[str] = ["body"] if field is None else ["body", field]
    cap = FIELD_MAX_ITEMS.get(field or "")
    if cap is not None and own > cap:
        return {"type": "too_long", "loc": loc,
                "msg": f"{field} should have at most {cap} items, not {own}",
                "input": f"{own} items", "ctx": {"max_length": cap, "actual_length": own}}
    return {"type": "too_long", "loc": loc,
            "msg": f"the request body holds more than {JSON_MAX_ITEMS} JSON values (items of "
                   f"its lists and objects), {total} of them here",
            "input": f"{total} values", "ctx": {"max_length": JSON_MAX_ITEMS}}


# -- text --------------------------------------------------------------------------------------


def reject_lone_surrogates(data: Any, title: str) -> Any:
    """`data` (a request body as parsed JSON) unchanged, or a `ValidationError` naming the
    first string (or key) that holds a lone surrogate.

    JSON's `"\\ud800"` escape parses to a Python string that UTF-8 cannot encode: the
    tokenizers, SQLite and the response encoder all fail on it. For a request model's
    `mode="before"` validator.
    """
    found = _lone_surrogate(data)
    if found is None:
        return data
    loc, text = found
    error = PydanticCustomError(
        "string_unicode", "Input should be valid Unicode: it holds a lone surrogate "
        "(a \\ud800-\\udfff escape that is not half of a pair)")
    raise ValidationError.from_exception_data(
        title, [InitErrorDetails(type=error, loc=loc, input=text)])


def _lone_surrogate(data: Any) -> tuple[tuple[str | int, ...], str] | None:
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:  # a loop, not recursion: a body may be nested deeply
        loc, node = stack.pop()
        if isinstance(node, str):
            if not _encodable(node):
                return loc, node
        elif isinstance(node, dict):
            for key in node:
                if isinstance(key, str) and not _encodable(key):
                    return (*loc, key), key
            stack.extend(((*loc, k), v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*loc, i), v) for i, v in reversed(list(enumerate(node))))
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
