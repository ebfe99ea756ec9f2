"""mistral-common backend: Mistral tokenizer files (`tokenizer.model.v*`, `tekken.json`).

Chat, tools and FIM are encoded by mistral-common exactly as Mistral's models were
trained (DESIGN.md principle 2); nothing here writes a template by hand. Tool calls are
parsed from token ids, so the `[TOOL_CALLS]` control token is never lost to decoding.
"""

from __future__ import annotations

import json
import secrets
import string
import warnings
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from sirocco.tokenizers.base import (
    FIMNotSupported,
    ParsedOutput,
    Tokenizer,
    TokenizerError,
    ToolCall,
)

#: File names mistral-common reads, in order of preference.
TOKENIZER_FILES = (
    "tekken.json",
    "tokenizer.model.v13",
    "tokenizer.model.v11",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model.v2",
    "tokenizer.model.v1",
)
_ID_ALPHABET = string.ascii_letters + string.digits


def find_mistral_tokenizer(directory: Path) -> Path | None:
    """The mistral-common tokenizer file shipped beside a checkpoint, if any."""
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(directory.glob("tokenizer.model.v*")) + sorted(
        directory.glob("tekken*.json")
    )
    return candidates[0] if candidates else None


def new_tool_call_id() -> str:
    """A tool-call id as Mistral models expect: 9 characters of [a-zA-Z0-9]."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _version_number(version: Any) -> int:
    return int(str(getattr(version, "value", version)).lstrip("v").split("m")[0])


class MistralCommonTokenizer(Tokenizer):
    """A Mistral tokenizer file read by mistral-common."""

    backend = "mistral-common"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.version = _version_number(self._raw.version)
        self.vocab_size = self._raw.n_words
        self.eos_token_ids = [self._raw.eos_id]
        self.bos_id = self._raw.bos_id
        self._special_ids = (
            set(self._raw.special_ids) if hasattr(self._raw, "special_ids") else set()
        )
        self.tool_calls_id = self._special("[TOOL_CALLS]")
        self.args_id = self._special("[ARGS]")
        self.call_id_id = self._special("[CALL_ID]")
        self.supports_tools = self.tool_calls_id is not None
        self.supports_fim = self._special("[SUFFIX]") is not None

    def _special(self, piece: str) -> int | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                token_id = self._raw.get_control_token(piece)
        except Exception:
            return None
        return token_id if self._raw.is_special(token_id) and token_id != self._raw.unk_id else None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final: bool = False,
    ) -> list[int]:
        try:
            request = ChatCompletionRequest.from_openai(
                messages, tools=tools or None, continue_final_message=continue_final
            )
            return self._mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, TypeError, KeyError) as exc:
            raise TokenizerError(str(exc)) from exc

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        if not self.supports_fim:
            raise FIMNotSupported(
                f"this model's tokenizer ({self.path.name}) has no fill-in-the-middle tokens"
            )
        try:
            return self._mistral.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
        except MistralCommonException as exc:
            raise TokenizerError(str(exc)) from exc

    def encode_text(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._raw.encode(text, bos=add_bos, eos=False)

    def decode(self, token_ids: list[int]) -> str:
        return self._raw.decode(list(token_ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        if hasattr(self._raw, "id_to_byte_piece"):  # Tekken: byte-level BPE
            return self._raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        piece = self._raw.id_to_piece(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if self.is_special(token_id):
            return piece.encode()
        return piece.replace("\u2581", " ").encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return bool(self._raw.is_special(token_id))

    def tool_call_start(self, token_ids: list[int]) -> int | None:
        if self.tool_calls_id is None or self.tool_calls_id not in token_ids:
            return None
        return token_ids.index(self.tool_calls_id)

    def parse_output(self, token_ids: list[int], tools_enabled: bool) -> ParsedOutput:
        ids = list(token_ids)
        if not tools_enabled or self.tool_calls_id is None or self.tool_calls_id not in ids:
            return ParsedOutput(content=self.decode(ids))
        first = ids.index(self.tool_calls_id)
        content = self.decode(ids[:first])
        calls = self._parse_calls(ids[first:])
        if calls is None:  # not a well-formed call: hand back the text as the model wrote it
            return ParsedOutput(content=self.decode(ids))
        return ParsedOutput(content=content, tool_calls=calls)

    def _parse_calls(self, ids: list[int]) -> list[ToolCall] | None:
        """Calls after `[TOOL_CALLS]`, in the format of this tokenizer version."""
        if self.args_id is not None and self.args_id in ids:
            # v11+: [TOOL_CALLS]name[ARGS]{json} (optionally [CALL_ID]id), repeated.
            calls: list[ToolCall] = []
            segments: list[list[int]] = []
            for token in ids:
                if token == self.tool_calls_id:
                    segments.append([])
                elif segments:
                    segments[-1].append(token)
            for segment in segments:
                if self.args_id not in segment:
                    return None
                split = segment.index(self.args_id)
                head, args = segment[:split], segment[split + 1 :]
                call_id = None
                if self.call_id_id is not None and self.call_id_id in head:
                    cut = head.index(self.call_id_id)
                    head, call_id = head[:cut], self.decode(head[cut + 1 :]).strip()
                arguments = _compact_json(self.decode(args))
                if arguments is None:
                    return None
                calls.append(ToolCall(self.decode(head).strip(), arguments, call_id))
            return calls or None
        # up to v7: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
        text = self.decode([t for t in ids if t != self.tool_calls_id]).strip()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(payload, dict):
            payload = [payload]
        calls = []
        for item in payload if isinstance(payload, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                arguments = _compact_json(arguments)
                if arguments is None:
                    return None
            else:
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(ToolCall(item["name"], arguments, item.get("id")))
        return calls or None


def _compact_json(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return None
