"""One generated choice: its tokens, its place in the KV cache, its sampling state."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from sirocco.engine.outputs import FinishReason, TokenLogprob
from sirocco.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A prompt and the tokens generated for one choice of a request.

    `num_computed_tokens` tokens have their keys and values in the cache blocks listed by
    `block_table`; the rest of `token_ids` still has to go through the model. A sequence
    in decode has exactly one token left to compute: the last one it sampled.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival_time: float | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.admitted = False
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table registered for prefixes
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.last_token_time: float | None = None
        # Choices that will be forked from this one once its prompt is in the cache.
        self.pending_forks: list[Sequence] = []
        self.generator: torch.Generator | None = None
        # The LoRA adapter this sequence runs with: its name seeds the prefix hashes (the
        # same tokens under another adapter have other keys and values) and its slot
        # picks the weights. None / 0: the base model.
        self.adapter: str | None = None
        self.lora_slot = 0
        # What the engine reports for this step, then clears.
        self.new_token_ids: list[int] = []
        self.new_logprobs: list[TokenLogprob] = []
        # With `params.prompt_logprobs`: entry p - 1 is prompt token p given tokens < p,
        # filled chunk by chunk by the model runner, reported once with the first token.
        self.prompt_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs_sent = False

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all recorded yet: the prompt positions from the
        first unrecorded one on must go through the model (not come from the prefix cache)."""
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def hash_seed(self) -> tuple[str, str] | None:
        """Where the chain of this sequence's block hashes starts."""
        return None if self.adapter is None else ("adapter", self.adapter)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if logprob is not None:
            self.new_logprobs.append(logprob)

    def share_prefix_of(self, parent: Sequence) -> None:
        """Become a copy of `parent` (a fork of the same prompt): same tokens, same cache
        blocks. The caller adds the block references."""
        self.token_ids = list(parent.token_ids)
        self.num_computed_tokens = parent.num_computed_tokens
        self.num_cached_tokens = parent.num_cached_tokens
        self.admitted = True
        self.block_table = list(parent.block_table)
        self.num_hashed_blocks = parent.num_hashed_blocks
        self.prompt_logprobs = list(parent.prompt_logprobs)
        self.adapter, self.lora_slot = parent.adapter, parent.lora_slot
