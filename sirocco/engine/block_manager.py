"""Ref-counted KV-cache blocks with prefix caching of full blocks.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns an ordered
list of blocks (its block table); forked choices share blocks, each reference counted.
A block that has been written to the end gets a hash chained over every token before it,
so a later prompt with the same prefix finds it and skips computing it. A block whose
count drops to zero goes back to the free list but keeps its contents and hash until it is
reused (least recently freed first), so a finished prompt stays cached while there is room.
"""

from __future__ import annotations

from dataclasses import dataclass

from sirocco.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    """Owns the KV blocks: who uses which, what each holds, which are free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: LRU first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # ... of which were found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # -- admission -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        At least one token is always left to compute (its logits pick the next token).
        A sequence that still needs prompt logprobs takes no more than the prompt
        positions it has already recorded (none on first admission): cached tokens would
        skip the logits it needs. Returns the number of tokens found; sets
        `seq.num_computed_tokens`.
        """
        assert not seq.block_table
        bs = self.block_size
        if self.enable_prefix_caching:
            num_blocks = (len(seq.token_ids) - 1) // bs
            if seq.needs_prompt_logprobs:
                num_blocks = min(num_blocks, len(seq.prompt_logprobs) // bs)
            parent: object = seq.hash_seed
            for i in range(num_blocks):
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = hash((parent, tokens))
                block_id = self.hash_to_block.get(h)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                self._ref(block_id)
                seq.block_table.append(block_id)
                parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_hashed_blocks = len(seq.block_table)
        return seq.num_computed_tokens

    def record_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += prompt_tokens
        self.prefix_hits += hit_tokens

    # -- growth ----------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        bs = self.block_size
        start = seq.num_computed_tokens
        needed = -(-(start + num_new_tokens) // bs) - len(seq.block_table)
        if start % bs and self.blocks[seq.block_table[start // bs]].ref_count > 1:
            needed += 1  # the shared, partly written block must be copied before writing
        return needed

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the next `num_new_tokens` tokens of `seq` (check `can_append`
        first). Returns the (source, destination) block copies to run before the forward
        (copy-on-write of a block shared with a forked choice)."""
        bs = self.block_size
        copies = []
        start = seq.num_computed_tokens
        if start % bs:
            i = start // bs
            old = self.blocks[seq.block_table[i]]
            if old.ref_count > 1:
                new_id = self._take_free()
                copies.append((old.block_id, new_id))
                old.ref_count -= 1
                seq.block_table[i] = new_id
        while len(seq.block_table) * bs < start + num_new_tokens:
            seq.block_table.append(self._take_free())
        return copies

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that are now completely computed, for later prefixes."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = seq.block_table
        start = seq.num_hashed_blocks
        parent = self.blocks[table[start - 1]].hash if start else seq.hash_seed
        for i in range(start, seq.num_computed_tokens // bs):
            block = self.blocks[table[i]]
            if block.hash is None:
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash = hash((parent, block.token_ids))
                self.hash_to_block.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = max(start, seq.num_computed_tokens // bs)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (call after `child.share_prefix_of`)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks stay cached until reused."""
        # Tail blocks first, so they are reused before the (more shareable) prefix blocks.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    # -- internals -------------------------------------------------------------------------

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id = next(iter(self.free_ids))
        del self.free_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
