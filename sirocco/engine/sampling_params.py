"""Per-request sampling parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""`(output_token_ids, logits [vocab]) -> logits`: called once per step per sequence,
before penalties and temperature. Grammar-constrained decoding plugs in here (set the
forbidden tokens to -inf). It may modify `logits` in place and return it."""


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token of one request.

    temperature 0 is greedy. top_k 0, top_p 1, min_p 0, top_a 0 and the penalties at
    their neutral values (0, 0, 1) are off. `max_tokens` None generates until a stop
    token or the context length. `stop_token_ids` add to the engine's end-of-sequence
    ids; `ignore_eos` keeps generating past the engine's end-of-sequence ids (not past
    `stop_token_ids`). `logprobs` None is off; k >= 0 returns the chosen token's
    log-probability and the k most likely alternatives, all of the RAW distribution
    (log_softmax of the model's logits before any processor, penalty, bias,
    temperature or truncation). `prompt_logprobs` None is off; k >= 0 records, for every
    prompt token after the first, its log-probability given the tokens before it and the
    k most likely alternatives (raw distribution too; the first prompt token has nothing
    before it, so it gets no entry). A request that asks for them computes its whole
    prompt: it takes no prefix-cache hits. With `n` > 1 and a seed, choice i uses
    seed + i; the n choices share this object, so a stateful logits processor should
    serve n = 1 requests (submit one request per choice).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    top_a: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 <= self.top_a <= 1, "top_a must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must be <= max_tokens"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             "prompt_logprobs must be >= 0"),
            (self.n >= 1, "n must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
