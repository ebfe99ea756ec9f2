"""A tokenizer's vocabulary compiled once for grammar-constrained decoding.

llguidance computes token masks over the byte strings of every token. Those come from
the tokenizer's own `token_bytes`, so the same code serves SentencePiece (mistral-common
v1-v7), Tekken and Hugging Face byte-level vocabularies. Control tokens (`is_special`),
the unknown token and tokens that stand for no bytes are marked special: llguidance
never lets text (JSON included) be spelled with them; a grammar can still ask for one by
id (`<[5]>`), which is how `[TOOL_CALLS]` and `[ARGS]` are forced.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable

import llguidance
import numpy as np

from sirocco.tokenizers.base import Tokenizer


class GrammarVocabulary:
    """One tokenizer's vocabulary as llguidance sees it, plus the masks every step reuses."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.size = tokenizer.vocab_size
        self.eos_token_ids = tuple(dict.fromkeys(tokenizer.eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("structured output needs a tokenizer with an end-of-sequence id")
        unknown = _unknown_token_id(tokenizer)
        tokens: list[bytes] = []
        special: list[int] = []
        special_names: set[bytes] = set()
        #: Original bytes of each special token -> its id (the first, for duplicates).
        self.special_ids_by_bytes: dict[bytes, int] = {}
        for token_id in range(self.size):
            data = tokenizer.token_bytes(token_id)
            if tokenizer.is_special(token_id) or token_id == unknown or not data:
                self.special_ids_by_bytes.setdefault(data, token_id)
                # A special token's bytes are only its name to llguidance; names must be unique.
                if not data or data in special_names:
                    data = f"<|special_{token_id}|>".encode()
                special_names.add(data)
                special.append(token_id)
            tokens.append(data)
        self.special_token_ids = frozenset(special)
        #: Bytes of every token as llguidance sees it (special tokens: a name, never text).
        self.token_bytes = tokens
        table = _TokenTable(tokenizer, tokens, special, self.eos_token_ids)
        self.llg_tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(table), eos_token=list(self.eos_token_ids)
        )
        table.greedy = self.llg_tokenizer.greedy_tokenize
        #: Names this vocabulary across processes: a constraint sent to the engine process
        #: is rebuilt there on the vocabulary with the same key (`vocabulary_by_key`).
        self.key = hashlib.sha256(b"\0".join(tokens) + repr(
            (self.eos_token_ids, sorted(special))).encode()).hexdigest()[:24]
        #: Forbidden-token mask when only end-of-sequence may follow.
        self.all_but_eos = np.ones(self.size, dtype=np.bool_)
        self.all_but_eos[list(self.eos_token_ids)] = False

    @property
    def mask_words(self) -> int:
        """Length of the int32 bitmask llguidance writes (one bit per token)."""
        return (self.size + 31) // 32


class _TokenTable:
    """The duck-typed tokenizer object `llguidance.TokenizerWrapper` reads.

    llguidance tokenizes the bytes a grammar forces and trusts the ids to spell exactly
    those bytes. SentencePiece adds a leading space to what it encodes, so a result that
    does not spell the text is replaced by llguidance's own greedy tokenization.
    """

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int],
                 eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        #: Set once the llguidance tokenizer built from this table exists.
        self.greedy: Callable[[str], list[int]] | None = None

    def __call__(self, text: str) -> list[int]:
        ids = self._tokenizer.encode_text(text)
        if self.greedy is None:
            return ids
        tokens = self.tokens
        if all(0 <= i < len(tokens) for i in ids) and b"".join(tokens[i] for i in ids) == (
            text.encode()
        ):
            return ids
        return self.greedy(text)


def _unknown_token_id(tokenizer: Tokenizer) -> int | None:
    """The unknown token's id, which mistral-common's SentencePiece does not mark special."""
    for owner in (tokenizer, getattr(tokenizer, "_raw", None), getattr(tokenizer, "_tok", None)):
        for name in ("unk_id", "unk_token_id"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value >= 0:
                return value
    return None


_cache: weakref.WeakKeyDictionary[Tokenizer, GrammarVocabulary] = weakref.WeakKeyDictionary()
_by_key: dict[str, GrammarVocabulary] = {}
_lock = threading.Lock()


def grammar_vocabulary(tokenizer: Tokenizer) -> GrammarVocabulary:
    """The compiled vocabulary of `tokenizer`, built on first use (about 0.2-1 s) and kept
    for as long as the tokenizer lives."""
    with _lock:
        vocabulary = _cache.get(tokenizer)
        if vocabulary is None:
            vocabulary = _cache[tokenizer] = GrammarVocabulary(tokenizer)
            _by_key.setdefault(vocabulary.key, vocabulary)
        return vocabulary


def vocabulary_by_key(key: str) -> GrammarVocabulary:
    """The vocabulary with this `key` that `grammar_vocabulary` built in this process
    (KeyError if none was)."""
    with _lock:
        try:
            return _by_key[key]
        except KeyError:
            raise KeyError(f"no grammar vocabulary {key!r} in this process") from None
