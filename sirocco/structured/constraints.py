"""Output constraints as engine logits processors.

A constraint factory is built once per request (the grammar is compiled against the
model's vocabulary there, so a bad schema fails before any model work); calling it gives
the logits processor of one sequence, with its own matcher state. With n > 1, call it
once per choice. A processor is called by the engine with the sequence's output ids so
far and its logits row; it advances its matcher by the ids appended since the last call,
then sets every token the grammar forbids to -inf with one `masked_fill_`. Once the
grammar is complete only end-of-sequence ids remain.

A processor shared by several sequences still gives each a correct mask (shown ids that
do not extend the ones it has seen, it replays them from the start), only more slowly.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from sirocco.engine.sampling_params import LogitsProcessor
from sirocco.structured.grammar import (
    InvalidSchema,
    json_object_grammar,
    json_schema_grammar,
    text_without_grammar,
    tool_call_grammar,
)
from sirocco.structured.vocabulary import (
    GrammarVocabulary,
    grammar_vocabulary,
    vocabulary_by_key,
)
from sirocco.tokenizers.base import Tokenizer

logger = logging.getLogger(__name__)


class ConstraintFactory(ABC):
    """Makes the logits processor of one sequence; call it once per sequence."""

    @abstractmethod
    def __call__(self) -> LogitsProcessor: ...


class GrammarConstraintFactory(ConstraintFactory):
    """A grammar compiled against one tokenizer's vocabulary."""

    def __init__(self, grammar: str, tokenizer: Tokenizer) -> None:
        self.grammar = grammar
        self.vocabulary = grammar_vocabulary(tokenizer)
        self._matcher = llguidance.LLMatcher(self.vocabulary.llg_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidSchema(_schema_error(self._matcher.get_error()))

    def __call__(self) -> GrammarConstraint:
        return GrammarConstraint(self.vocabulary, self._matcher, self.grammar)


class GrammarConstraint:
    """Logits processor that keeps one sequence inside a grammar."""

    def __init__(self, vocabulary: GrammarVocabulary, template: llguidance.LLMatcher,
                 grammar: str) -> None:
        self._vocabulary = vocabulary
        self._grammar = grammar
        self._template = template
        self._matcher = template.deep_copy()
        self._tokens: list[int] = []
        self._words = np.zeros(vocabulary.mask_words, dtype=np.int32)
        self._inverted = np.zeros_like(self._words)
        #: Why the sequence left the grammar (a token the mask forbade was appended).
        self.error: str | None = None

    def __reduce__(self) -> tuple:
        # Sent to the engine process before its first step: the grammar text and the
        # vocabulary's key travel, the matcher is compiled again on the other side.
        if self._tokens:
            raise TypeError("a grammar constraint is sent before it has seen any token")
        return _rebuild_constraint, (self._vocabulary.key, self._grammar)

    @property
    def is_complete(self) -> bool:
        """Whether the grammar is satisfied and only end-of-sequence may follow."""
        return self.error is None and self._matcher.is_stopped()

    def __call__(self, output_token_ids: list[int], logits: Tensor) -> Tensor:
        self._advance(output_token_ids)
        _mask(logits, self._forbidden())
        return logits

    def _advance(self, output: list[int]) -> None:
        done = len(self._tokens)
        if output[:done] != self._tokens:
            # Not the sequence seen last time (a shared processor, or ids taken back): start
            # over. (llguidance's rollback was seen to leave a different mask behind.)
            self._matcher = self._template.deep_copy()
            self._tokens = []
            self.error = None
            done = 0
        for token in output[done:]:
            self._tokens.append(token)
            if self.error is None and not self._matcher.consume_token(token):
                self._fail(f"token {token} is not allowed here: {_first_line(self._matcher)}")

    def _fail(self, reason: str) -> None:
        self.error = reason
        logger.warning("structured output: %s; only end-of-sequence is allowed now", reason)

    def _forbidden(self) -> np.ndarray:
        """Bool mask [vocabulary size], True where the token may not come next."""
        if self.error is not None or self._matcher.is_stopped():
            return self._vocabulary.all_but_eos
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self._matcher.is_error():
            self._fail(_first_line(self._matcher))
            return self._vocabulary.all_but_eos
        np.invert(words, out=self._inverted)
        bits = np.unpackbits(self._inverted.view(np.uint8), count=self._vocabulary.size,
                             bitorder="little")
        return bits.view(np.bool_)


def _rebuild_constraint(vocabulary_key: str, grammar: str) -> GrammarConstraint:
    vocabulary = vocabulary_by_key(vocabulary_key)
    matcher = llguidance.LLMatcher(vocabulary.llg_tokenizer, grammar, log_level=0)
    return GrammarConstraint(vocabulary, matcher, grammar)


class TokenBan(ConstraintFactory):
    """Fixed token ids made impossible (tool_choice none). Its processor keeps no state,
    so every sequence shares it."""

    def __init__(self, token_ids: Iterable[int]) -> None:
        self.token_ids = sorted(set(token_ids))
        self._index = torch.tensor(self.token_ids, dtype=torch.long)

    def __call__(self) -> LogitsProcessor:
        return self._ban

    def _ban(self, output_token_ids: list[int], logits: Tensor) -> Tensor:
        if self.token_ids:
            if self._index.device != logits.device:
                self._index = self._index.to(logits.device)
            logits.index_fill_(-1, self._index, float("-inf"))
        return logits


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def _mask(logits: Tensor, forbidden: np.ndarray) -> None:
    """Set `logits` to -inf where `forbidden` is True and past the vocabulary's end.

    On the CPU this is one numpy `putmask` on the tensor's own memory: single-threaded,
    where torch would split a 131k-row `masked_fill_` over threads that, on a busy
    machine, cost 10-20 ms to wake.
    """
    size, width = forbidden.shape[0], logits.shape[-1]
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES:
        array = logits.detach().numpy()
        if width > size:  # the model's embedding is padded past the tokenizer's vocabulary
            array[..., size:] = -np.inf
            array = array[..., :size]
        np.putmask(array, forbidden[:width], -np.inf)
        return
    mask = torch.from_numpy(forbidden).to(logits.device, non_blocking=True)
    if width > size:
        logits[..., size:] = float("-inf")
        logits = logits[..., :size]
    logits.masked_fill_(mask[:width], float("-inf"))


def _first_line(matcher: llguidance.LLMatcher) -> str:
    return (matcher.get_error().strip().splitlines() or ["unknown error"])[0]


def _schema_error(message: str) -> str:
    first = (message.strip().splitlines() or ["cannot compile it"])[0]
    # Drop the position in our generated grammar text and the compiler's own preamble.
    first = re.sub(r"^at \d+\(\d+\): ", "", first).replace("failed to compile JSON schema: ", "")
    return f"invalid or unsupported JSON schema: {first}"


# -- what the chat service builds ------------------------------------------------------


def json_object(tokenizer: Tokenizer) -> GrammarConstraintFactory:
    """Output is one JSON object (response_format json_object)."""
    return GrammarConstraintFactory(json_object_grammar(), tokenizer)


def json_schema(schema: dict[str, Any], strict: bool, tokenizer: Tokenizer
                ) -> GrammarConstraintFactory:
    """Output validates against `schema` (response_format json_schema).

    Raises `InvalidSchema` for a schema that is invalid, or that uses a keyword the
    grammar cannot enforce while `strict` (without it, such a keyword is ignored).
    """
    return GrammarConstraintFactory(json_schema_grammar(schema, strict), tokenizer)


def tool_call(tools: list[dict[str, Any]], choice: str, parallel: bool, tokenizer: Tokenizer
              ) -> GrammarConstraintFactory:
    """Output is a tool call in the tokenizer's own format (tool_choice any / required / a
    named function), arguments validating against the function's `parameters`; several
    calls only with `parallel`. Raises `InvalidSchema` for unusable tools or choice."""
    special_ids = grammar_vocabulary(tokenizer).special_ids_by_bytes
    grammar = tool_call_grammar(tools, choice, parallel, tokenizer, special_ids)
    try:
        return GrammarConstraintFactory(grammar, tokenizer)
    except InvalidSchema as exc:
        # Say which tool's parameters the compiler refused.
        for index, tool in enumerate(tools):
            function = tool["function"]
            parameters = function.get("parameters") or {"type": "object"}
            strict = bool(function.get("strict", False))
            problem = llguidance.LLMatcher.validate_grammar(json_schema_grammar(parameters, strict))
            if problem:
                raise InvalidSchema(f"tools[{index}].function.parameters: {exc}") from None
        raise


def forbid_tokens(token_ids: Iterable[int]) -> TokenBan:
    """The given ids can never be produced."""
    return TokenBan(token_ids)


def tool_call_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that open a tool call in this tokenizer's format, for tool_choice none: Mistral's
    `[TOOL_CALLS]`, or a special `<tool_call>` token. Empty when calls are plain text (a
    Hermes model without such a token): then no token ban can stop them."""
    tool_calls_id = getattr(tokenizer, "tool_calls_id", None)
    if tool_calls_id is not None:
        return [tool_calls_id]
    open_token = grammar_vocabulary(tokenizer).special_ids_by_bytes.get(b"<tool_call>")
    return [open_token] if open_token is not None else []


def no_tool_calls(tokenizer: Tokenizer) -> ConstraintFactory:
    """tool_choice none: the model cannot start a tool call. A ban of the opening control
    token where the format has one; otherwise (Hermes calls written as plain text) a
    grammar of free text that never contains `<tool_call>`."""
    token_ids = tool_call_token_ids(tokenizer)
    if token_ids:
        return TokenBan(token_ids)
    return GrammarConstraintFactory(text_without_grammar("<tool_call>"), tokenizer)
