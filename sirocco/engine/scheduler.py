"""The waiting and running queues: who runs in the next step, and how many tokens each.

Every step gets a token budget (`max_num_batched_tokens`). Running sequences go first,
decodes (one token each) before unfinished prefills, so a long prompt never stalls the
decodes; then waiting sequences are admitted in arrival order while budget, sequence
slots and KV blocks last. A prompt longer than the budget is prefilled in chunks over
several steps. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the
waiting queue, to be recomputed (mostly from the prefix cache) when there is room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sirocco.engine.block_manager import BlockManager
from sirocco.engine.config import EngineConfig
from sirocco.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: the chunk length of each scheduled sequence, block copies to run
    first, and the sequences preempted to make room."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Owns the waiting and running queues and preemption."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        queue = deque(sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1))
        self.running = []
        while queue:
            seq = queue.popleft()
            n = min(self._tokens_to_compute(seq), budget)
            if n == 0:
                self.running.append(seq)
                continue
            while not bm.can_append(seq, n):
                if queue:
                    self._preempt(queue.pop(), batch)
                else:
                    self._preempt(seq, batch)
                    break
            else:
                self._schedule(seq, n, batch)
                budget -= n
        while (self.waiting and budget > 0 and not batch.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting.popleft()
            if not seq.block_table:
                bm.match_prefix(seq)
            n = min(self._tokens_to_compute(seq), budget)  # (may fork: children wait first)
            if not bm.can_append(seq, n):
                bm.free(seq)
                self.waiting.appendleft(seq)
                if not self.running:  # only waiting forks hold blocks: let them recompute
                    for other in self.waiting:
                        bm.free(other)
                break
            if not seq.admitted:  # first admission: report what the prefix cache held
                seq.admitted = True
                seq.num_cached_tokens = seq.num_computed_tokens
                bm.record_prefix_lookup(seq.num_prompt_tokens, seq.num_cached_tokens)
            seq.status = SequenceStatus.RUNNING
            self._schedule(seq, n, batch)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        for child in seq.pending_forks:
            child.status = SequenceStatus.FINISHED
        seq.pending_forks = []

    # -- internals -------------------------------------------------------------------------

    def _tokens_to_compute(self, seq: Sequence) -> int:
        """Tokens left to compute; a parent of n > 1 choices stops before its last prompt
        token and forks there, so each choice computes that token and samples its own."""
        if seq.pending_forks:
            left = seq.num_prompt_tokens - 1 - seq.num_computed_tokens
            if left > 0:
                return left
            self._fork(seq)
        return seq.num_uncomputed_tokens

    def _fork(self, parent: Sequence) -> None:
        for child in reversed(parent.pending_forks):
            child.share_prefix_of(parent)
            self.block_manager.fork(parent, child)
            self.waiting.appendleft(child)
        parent.pending_forks = []

    def _schedule(self, seq: Sequence, n: int, batch: ScheduledBatch) -> None:
        batch.block_copies += self.block_manager.append_slots(seq, n)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        self.running.append(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1
