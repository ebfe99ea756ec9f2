"""Ref-counted blocks, prefix hashes, copy-on-write."""

from __future__ import annotations

import pytest
import torch

from sirocco.engine.block_manager import BlockManager
from sirocco.engine.config import EngineConfig, resolve_dtype
from sirocco.engine.sampling_params import SamplingParams
from sirocco.engine.sequence import Sequence


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose tokens all went through the model."""
    seq = Sequence("r", tokens, SamplingParams())
    bm.match_prefix(seq)
    n = len(tokens) - seq.num_computed_tokens
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)
    return seq


def test_a_finished_prompt_stays_cached_until_its_blocks_are_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    first = computed(bm, [1, 2, 3, 4, 5])
    first_blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 4
    again = Sequence("r2", [1, 2, 3, 4, 9], SamplingParams())
    assert bm.match_prefix(again) == 4  # two full blocks
    assert again.block_table == first_blocks[:2]
    bm.free(again)
    computed(bm, [7, 7, 7, 7, 7, 7, 7, 7])  # takes every block: the old prefix is evicted
    assert bm.match_prefix(Sequence("r3", [1, 2, 3, 4, 9], SamplingParams())) == 0


def test_the_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.free(computed(bm, [1, 2, 3, 4]))
    seq = Sequence("r", [1, 2, 3, 4], SamplingParams())
    assert bm.match_prefix(seq) == 2  # block 2 holds the last token: it is recomputed


def test_forked_sequences_copy_a_shared_partial_block_before_writing():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = computed(bm, [1, 2, 3, 4, 5, 6])
    child = Sequence("r", [1, 2, 3, 4, 5, 6], SamplingParams(), index=1)
    child.share_prefix_of(parent)
    bm.fork(parent, child)
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    copies = bm.append_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert bm.append_slots(parent, 1) == []  # now the parent's only
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_dtype_auto_and_names():
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(ValueError):
        EngineConfig(max_num_batched_tokens=0)
