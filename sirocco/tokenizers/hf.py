"""Hugging Face tokenizers with the model's own chat template, for every non-Mistral model.

Prompts are rendered by transformers' `apply_chat_template` with the template the model
ships; Sirocco never writes a template of its own. Control tokens that appear in message
text are encoded as plain text (`sanitize_control_tokens`), so a user cannot forge a turn.

Tools follow the Hermes convention that ChatML models are trained on. How they reach
the model depends on what the template understands:

* A template that reads `tools` gets them as `tools=` (the wire's
  `{"type": "function", "function": {...}}` objects, unchanged).
* Otherwise the tools go into the system message (appended after a blank line to the
  caller's system message, or as a new first system message), in this format::

      # Tools

      You can call functions to help with the user's request. Their signatures, one
      JSON object per line, are inside <tools></tools>:
      <tools>
      {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
      </tools>

      To call a function, answer with a JSON object holding its name and arguments,
      inside <tool_call></tool_call> tags, one block per call:
      <tool_call>
      {"name": "<function name>", "arguments": {"<argument>": <value>}}
      </tool_call>
      Results come back inside <tool_response></tool_response> tags.

* A template that mentions `tool_calls` renders assistant tool calls and `tool` messages
  itself (arguments passed as objects, the Hugging Face convention).
* Otherwise an assistant tool call is rendered as its text,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after any content, and
  tool results become a user message holding one
  `<tool_response>\\n{content}\\n</tool_response>` block per result (consecutive results
  share one message).

The model's answer is parsed back the same way: every `<tool_call>{json}</tool_call>`
block (an unclosed last block too, if its JSON is whole) becomes a `ToolCall`; blocks
that are not a JSON call stay in the content.
"""

from __future__ import annotations

import bisect
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from sirocco.tokenizers.base import (
    FIMNotSupported,
    ParsedOutput,
    Tokenizer,
    TokenizerError,
    ToolCall,
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TOOLS_SYSTEM_PROMPT = """# Tools

You can call functions to help with the user's request. Their signatures, one JSON object \
per line, are inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments, inside \
<tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{"<argument>": <value>}}}}
</tool_call>
Results come back inside <tool_response></tool_response> tags."""

# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
)

# Fill-in-the-middle token sets, in the order the model was trained on them.
# "psm": prefix, suffix, middle. "spm": Mistral's [SUFFIX] suffix [PREFIX] prefix.
_FIM_STYLES = (
    ("psm", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")),
    ("psm", ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")),
    ("spm", ("[PREFIX]", "[SUFFIX]", None)),
)

_TOOL_CALL_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL
)
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ROLES = ("system", "user", "assistant", "tool")


class HFTokenizer(Tokenizer):
    """A transformers tokenizer and its chat template behind Sirocco's tokenizer interface."""

    backend = "hf"
    supports_tools = True

    def __init__(
        self, source: str | Path | Any, extra_eos_token_ids: list[int] | None = None
    ) -> None:
        """From a local model directory, or from an already loaded transformers tokenizer.

        A directory is read with `AutoTokenizer.from_pretrained` (local files only, never
        a download); its generation_config.json may add end-of-sequence ids.
        """
        if isinstance(source, (str, Path)):
            path = Path(source)
            tokenizer = _load_local(path)
            extra_eos_token_ids = [*(extra_eos_token_ids or []), *_generation_config_eos(path)]
        else:
            tokenizer = source
        self._tok = tokenizer
        self.vocab_size = len(tokenizer)
        added = tokenizer.added_tokens_decoder
        self._added_text = {i: t.content for i, t in added.items()}
        self._special = {i for i, t in added.items() if t.special} | set(tokenizer.all_special_ids)
        self.eos_token_ids = self._find_eos_ids(extra_eos_token_ids or [])
        self._fim = self._find_fim_tokens()
        self.supports_fim = self._fim is not None
        self._token_bytes: list[bytes] | None = None
        self._keep_when_parsing = {
            i for i, text in self._added_text.items() if text in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
        }
        # Streaming holds back text that could begin "<tool_call>", unless a control token
        # (which never shows in the text) opens calls in this vocabulary.
        opens_as_token = any(
            self._added_text[i] == TOOL_CALL_OPEN and i in self._special
            for i in self._keep_when_parsing
        )
        self.tool_call_marker = None if opens_as_token else TOOL_CALL_OPEN

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HFTokenizer:
        """Same as `HFTokenizer(path)`: the tokenizer of a local model directory."""
        return cls(Path(path))

    # -- what the chat template understands ------------------------------------------

    @cached_property
    def template_takes_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable."""
        return "tools" in _template_variables(self._template_source(tools=True))

    @cached_property
    def template_renders_tool_calls(self) -> bool:
        """Whether the chat template renders assistant `tool_calls` and tool results."""
        return "tool_calls" in self._template_source(tools=True)

    def _template_source(self, tools: bool) -> str:
        template = self._tok.chat_template or ""
        if isinstance(template, dict):  # named templates; transformers picks the same way
            return template.get("tool_use" if tools else "default") or template.get("default", "")
        return template

    # -- encoding ----------------------------------------------------------------------

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final: bool = False,
    ) -> list[int]:
        if not self._tok.chat_template:
            raise TokenizerError("this model has no chat template, so it cannot chat")
        if not messages:
            raise TokenizerError("messages must not be empty")
        if continue_final and messages[-1].get("role") != "assistant":
            raise TokenizerError("only a final assistant message can be continued")
        native_calls = self.template_renders_tool_calls
        chat = self._template_messages(messages, native_calls)
        template_tools = None
        if tools:
            if self.template_takes_tools:
                template_tools = tools
            else:
                chat = _with_tools_system_message(chat, tools)
        try:
            ids = self._tok.apply_chat_template(
                chat,
                tools=template_tools,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
        except Exception as exc:  # jinja errors and the template's raise_exception
            raise TokenizerError(
                f"the model's chat template rejected the conversation: {exc}"
            ) from exc
        return list(ids)

    def _template_messages(
        self, messages: list[dict[str, Any]], native_calls: bool
    ) -> list[dict[str, Any]]:
        chat: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in _ROLES:
                raise TokenizerError(f"messages[{index}].role {role!r} is not one of {_ROLES}")
            content = _text_content(message.get("content"), index)
            calls = message.get("tool_calls") or []
            if role == "assistant" and calls:
                parsed = [_wire_call(call, index, n) for n, call in enumerate(calls)]
                if native_calls:
                    chat.append({"role": role, "content": content, "tool_calls": parsed})
                else:
                    blocks = [_tool_call_text(call["function"]) for call in parsed]
                    text = "\n".join(([content] if content else []) + blocks)
                    chat.append({"role": role, "content": text})
            elif role == "tool" and not native_calls:
                block = f"<tool_response>\n{content}\n</tool_response>"
                if chat and chat[-1].get("_tool_results"):
                    chat[-1]["content"] += "\n" + block
                else:
                    chat.append({"role": "user", "content": block, "_tool_results": True})
            elif role == "tool":
                entry = {"role": role, "content": content}
                for key in ("tool_call_id", "name"):
                    if message.get(key) is not None:
                        entry[key] = message[key]
                chat.append(entry)
            else:
                chat.append({"role": role, "content": content})
        for entry in chat:
            entry.pop("_tool_results", None)
        return chat

    def encode_text(self, text: str, *, add_bos: bool = False) -> list[int]:
        # Text is text: a control token written in it is not a control token.
        ids = self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        bos = self._tok.bos_token_id
        return [bos, *ids] if add_bos and bos is not None else list(ids)

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        if self._fim is None:
            raise FIMNotSupported("this model's tokenizer has no fill-in-the-middle tokens")
        style, (prefix_id, suffix_id, middle_id) = self._fim
        if style == "spm":
            head = [self._tok.bos_token_id] if self._tok.bos_token_id is not None else []
            return [
                *head,
                suffix_id,
                *self.encode_text(suffix),
                prefix_id,
                *self.encode_text(prompt),
            ]
        return [
            prefix_id,
            *self.encode_text(prompt),
            suffix_id,
            *self.encode_text(suffix),
            middle_id,
        ]

    # -- decoding ----------------------------------------------------------------------

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(
            list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def token_bytes(self, token_id: int) -> bytes:
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        return self._token_bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def tool_call_start(self, token_ids: list[int]) -> int | None:
        """Index of the token holding the start of the first `<tool_call>`, if any."""
        marker = TOOL_CALL_OPEN.encode()
        offsets: list[int] = []
        pieces: list[bytes] = []
        length = 0
        for token_id in token_ids:
            offsets.append(length)
            piece = self.token_bytes(token_id)
            pieces.append(piece)
            length += len(piece)
        found = b"".join(pieces).find(marker)
        if found < 0:
            return None
        return bisect.bisect_right(offsets, found) - 1

    def parse_output(self, token_ids: list[int], tools_enabled: bool) -> ParsedOutput:
        if not tools_enabled:
            return ParsedOutput(content=self.decode(token_ids))
        # Keep <tool_call> markers even where the vocabulary makes them special tokens.
        kept = [i for i in token_ids if i not in self._special or i in self._keep_when_parsing]
        text = self._tok.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return parse_tool_calls(text)

    # -- tables built once -------------------------------------------------------------

    def _find_eos_ids(self, extra: list[int]) -> list[int]:
        found: list[int] = []
        if self._tok.eos_token_id is not None:
            found.append(self._tok.eos_token_id)
        found.extend(extra)
        by_text = {text: i for i, text in self._added_text.items()}
        found.extend(by_text[t] for t in END_OF_TURN_TOKENS if t in by_text)
        return list(dict.fromkeys(found))

    def _find_fim_tokens(self) -> tuple[str, tuple[int, int, int | None]] | None:
        vocab = self._tok.get_vocab()
        for style, names in _FIM_STYLES:
            if all(name is None or name in vocab for name in names):
                prefix, suffix, middle = (vocab[n] if n else None for n in names)
                return style, (prefix, suffix, middle)
        return None

    def _build_token_bytes(self) -> list[bytes]:
        decoders = _decoder_types(self._tok)
        pieces = self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        if "ByteLevel" in decoders:
            table = _unicode_to_byte()

            def piece_bytes(piece: str) -> bytes:
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
                return piece.encode()
        elif "ByteFallback" in decoders or "Metaspace" in decoders:

            def piece_bytes(piece: str) -> bytes:
                match = _BYTE_FALLBACK.match(piece)
                if match:
                    return bytes([int(match.group(1), 16)])
                return piece.replace("\u2581", " ").encode()
        else:
            piece_bytes = None
        out: list[bytes] = []
        for token_id, piece in enumerate(pieces):
            if token_id in self._added_text:
                out.append(self._added_text[token_id].encode())
            elif piece is None:
                out.append(b"")
            elif piece_bytes is not None:
                out.append(piece_bytes(piece))
            else:
                out.append(self.decode([token_id]).encode())
        return out


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split model text into content and the `<tool_call>{json}</tool_call>` calls in it."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in _TOOL_CALL_BLOCK.finditer(text):
        parsed = _parse_call_block(match.group(1))
        if parsed is None:
            continue  # not a call: leave the text where it is
        kept.append(text[position : match.start()])
        position = match.end()
        calls.extend(parsed)
    kept.append(text[position:])
    content = "".join(kept).strip() if calls else "".join(kept)
    return ParsedOutput(content=content, tool_calls=calls)


def _parse_call_block(body: str) -> list[ToolCall] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        calls.append(ToolCall(name=item["name"], arguments=compact))
    return calls or None


def render_tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-message text that presents tools to a template that cannot take them."""
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_SYSTEM_PROMPT.format(tools=lines)


def _with_tools_system_message(
    chat: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    prompt = render_tools_system_prompt(tools)
    if chat and chat[0]["role"] == "system":
        first = dict(chat[0])
        first["content"] = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
        return [first, *chat[1:]]
    return [{"role": "system", "content": prompt}, *chat]


def _text_content(content: Any, index: int) -> str:
    """Wire content (a string, null, or a list of chunks) as the text a template takes."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for chunk in content:
            kind = chunk.get("type") if isinstance(chunk, dict) else None
            if kind != "text":
                raise TokenizerError(
                    f"messages[{index}].content: chunk type {kind!r} is not supported by this "
                    "model; it takes text only"
                )
            texts.append(chunk.get("text") or "")
        return "".join(texts)
    raise TokenizerError(f"messages[{index}].content must be a string or a list of chunks")


def _wire_call(call: dict[str, Any], index: int, n: int) -> dict[str, Any]:
    """A wire tool call with its arguments as an object, the way templates expect them."""
    function = call.get("function") or {}
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TokenizerError(f"messages[{index}].tool_calls[{n}].function.name is missing")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise TokenizerError(
                f"messages[{index}].tool_calls[{n}].function.arguments is not valid JSON"
            ) from exc
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _tool_call_text(function: dict[str, Any]) -> str:
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]})
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _template_variables(source: str) -> set[str]:
    import jinja2
    from jinja2 import meta

    try:
        return set(meta.find_undeclared_variables(jinja2.Environment().parse(source)))
    except jinja2.TemplateError:
        return set()


def _decoder_types(tokenizer: Any) -> set[str]:
    """Types of the fast tokenizer's decoder steps (ByteLevel, ByteFallback, Metaspace...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {step.get("type", "") for step in steps}


def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE's map from the printable stand-in characters back to bytes.

    Printable Latin-1 bytes stand for themselves; every other byte, in order, is shifted
    to code point 256 and up (the scheme GPT-2 introduced).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _load_local(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise TokenizerError(f"cannot load a tokenizer from {path}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc


def _generation_config_eos(path: Path) -> list[int]:
    """End-of-sequence ids a model's generation_config.json adds, if it has one."""
    try:
        config = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return []
    eos = config.get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    return [i for i in eos if isinstance(i, int)] if isinstance(eos, list) else []
