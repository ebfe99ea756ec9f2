"""The one tokenizer interface the rest of Sirocco talks to.

Two backends implement it: mistral-common for Mistral tokenizer files
(`tokenizers/mistral.py`) and Hugging Face tokenizers with the model's own chat template
for every other model (`tokenizers/hf.py`). Callers never ask which one they hold.

Messages and tools are passed in their wire shape (plain dicts, as the chat request
carries them), so neither backend depends on our pydantic models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class TokenizerError(ValueError):
    """A conversation or prompt the tokenizer cannot encode; the message is user-facing."""


class FIMNotSupported(TokenizerError):
    """The model's tokenizer has no fill-in-the-middle tokens."""


@dataclass(slots=True)
class ToolCall:
    """One function call the model produced, parsed from its output tokens."""

    name: str
    arguments: str  # a JSON document, as the wire contract wants it
    id: str | None = None


@dataclass(slots=True)
class ParsedOutput:
    """Model output split into plain text and tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


class Tokenizer(ABC):
    """Encodes prompts and decodes generations for one model."""

    #: Number of token ids the model's embedding must cover.
    vocab_size: int
    #: Ids that end a generation (eos and any end-of-turn tokens).
    eos_token_ids: list[int]
    #: Whether `encode_fim` works for this model.
    supports_fim: bool = False
    #: Whether the chat encoding can present tools to the model.
    supports_tools: bool = True
    #: Short name of the backend, for logs and model cards.
    backend: str = ""
    #: Text that opens a tool call when calls are written as text (Hermes `<tool_call>`);
    #: None when a control token opens them. Streaming holds back what could begin it.
    tool_call_marker: str | None = None

    @abstractmethod
    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final: bool = False,
    ) -> list[int]:
        """Token ids of a chat prompt, ready for generation of the next assistant turn.

        With `continue_final`, the last message is an assistant prefix the model continues.
        Raises `TokenizerError` for a conversation the model cannot take.
        """

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """Token ids of a fill-in-the-middle prompt (code before and after the cursor)."""
        raise FIMNotSupported("this model's tokenizer has no fill-in-the-middle tokens")

    @abstractmethod
    def encode_text(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Plain text to token ids (no chat template)."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text, special tokens left out."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (partial characters possible)."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether the id is a control token (never part of text or JSON)."""

    def token_text(self, token_id: int) -> str:
        """A readable form of one token, for logprobs."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def tool_call_start(self, token_ids: list[int]) -> int | None:
        """Index of the token where a tool call begins in a generation, if one has."""
        return None

    def parse_output(self, token_ids: list[int], tools_enabled: bool) -> ParsedOutput:
        """Split a finished generation into content and tool calls (from token ids)."""
        return ParsedOutput(content=self.decode(token_ids))

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental decoder for one generation."""
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Decoding token by token breaks multi-byte characters and SentencePiece's leading
    spaces, so each step decodes a short window ending at the newest token and emits
    only what was not emitted before; an incomplete character (U+FFFD at the end) waits
    for the next token.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def push(self, new_token_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = decode(self.token_ids[self._prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Text held back at the end of a generation (a dangling partial character)."""
        rest = self._tokenizer.decode(self.token_ids[self._prefix_offset :])
        prefix_text = self._tokenizer.decode(
            self.token_ids[self._prefix_offset : self._read_offset]
        )
        delta = rest[len(prefix_text) :] if rest.startswith(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta
