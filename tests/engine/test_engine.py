"""The engine end to end against transformers: paged cache, chunks, prefix cache,
preemption, forks; and the errors a request can get at submit time."""

from __future__ import annotations

import pytest
import torch

from sirocco.engine import EngineConfig, LLMEngine, RequestTooLong, SamplingParams
from tests.engine.conftest import (
    LogitsRecorder,
    hf_greedy,
    hf_next_token_logits,
    random_prompts,
)

ATOL = 1e-4


def make_engine(ckpt, **overrides) -> LLMEngine:
    kwargs = dict(dtype="float32", block_size=4, kv_cache_memory=2**20, max_num_seqs=16,
                  max_num_batched_tokens=256)
    kwargs.update(overrides)
    return LLMEngine(ckpt.model_config, ckpt.state_dict, EngineConfig(**kwargs))


def run_and_check_logits(ckpt, engine: LLMEngine, prompts: list[list[int]],
                         max_tokens: int = 8) -> list[list[int]]:
    """Greedy-generate every prompt at once; check each step's logits and the tokens."""
    recorders = [LogitsRecorder() for _ in prompts]
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, logits_processors=[r])
              for r in recorders]
    outputs = [o[0] for o in engine.generate(prompts, params)]
    for prompt, output, rec in zip(prompts, outputs, recorders, strict=True):
        assert len(output) == max_tokens
        ref = hf_next_token_logits(ckpt, prompt, output)
        torch.testing.assert_close(torch.stack(rec.rows), ref, atol=ATOL, rtol=0)
        assert output == hf_greedy(ckpt, prompt, max_tokens)
    return outputs


def test_greedy_batch_of_different_lengths_matches_transformers(tiny):
    engine = make_engine(tiny)
    run_and_check_logits(tiny, engine, random_prompts([5, 9, 13, 3, 17]), max_tokens=10)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sliding_window_shorter_than_sequence(tiny_windowed):
    engine = make_engine(tiny_windowed)
    run_and_check_logits(tiny_windowed, engine, random_prompts([12, 3], seed=1), max_tokens=9)


@pytest.mark.parametrize("ckpt", ["tiny", "tiny_windowed"])
def test_prompts_of_the_same_length_prefill_as_one_grid(ckpt, request):
    ckpt = request.getfixturevalue(ckpt)
    engine = make_engine(ckpt)
    engine.runner.invariant_attention = False  # the grids are PyTorch attention's layout
    grids = []

    def prepare(batch, original=engine.runner._prepare):
        out = original(batch)
        grids.extend((g.batch_size, g.end - g.start) for g in out[2].groups)
        return out

    engine.runner._prepare = prepare
    run_and_check_logits(ckpt, engine, random_prompts([9, 9, 9, 4, 4, 7], seed=10), max_tokens=5)
    assert grids[:3] == [(3, 27), (2, 8), (1, 7)]  # the first step: three grids of prompts


def test_chunked_prefill_matches(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=7)
    run_and_check_logits(tiny, engine, random_prompts([23, 2, 15], seed=2), max_tokens=6)


def test_prefix_cache_hit_is_reported_and_exact(tiny):
    engine = make_engine(tiny)
    [first] = random_prompts([18], seed=3)
    run_and_check_logits(tiny, engine, [first], max_tokens=3)
    second = first[:13] + [5, 6, 7]
    engine.add_request("again", second, SamplingParams(temperature=0, max_tokens=1))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[0].num_cached_tokens == 12  # 3 full blocks of 4 tokens
    assert engine.stats().cached_prompt_tokens == 12
    run_and_check_logits(tiny, engine, [second], max_tokens=5)


def test_preempted_sequences_resume_exactly(tiny):
    # 12 blocks of 4 tokens: four sequences of ~24 tokens cannot all stay resident.
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4  # layers * (k, v) * kv_heads * head_dim * 4 B * 4
    engine = make_engine(tiny, kv_cache_memory=12 * bytes_per_block)
    assert engine.runner.num_blocks == 12
    run_and_check_logits(tiny, engine, random_prompts([10, 14, 8, 12], seed=4), max_tokens=12)
    assert engine.scheduler.num_preemptions > 0


def test_n_choices_share_the_prompt_blocks(tiny):
    engine = make_engine(tiny)
    [prompt] = random_prompts([10], seed=5)
    engine.add_request("fork", prompt, SamplingParams(temperature=0, max_tokens=4, n=3))
    engine.step()  # the parent prefills its prompt but the last token
    blocks = engine.block_manager.blocks
    parent_table = list(engine.requests["fork"][0].block_table)
    engine.step()  # fork: all three choices compute the last prompt token
    tables = [s.block_table for s in engine.requests["fork"]]
    assert all(t[:2] == parent_table[:2] for t in tables)  # the full blocks are shared
    assert blocks[parent_table[0]].ref_count == 3
    results = {i: [] for i in range(3)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                results[c.index] += c.new_token_ids
    expected = hf_greedy(tiny, prompt, 4)
    # the tokens of the first step were delivered before the loop; check the tail only
    assert all(results[i] == expected[1:] for i in range(3))


def test_n_seeded_choices_differ_and_repeat(tiny):
    engine = make_engine(tiny)
    [prompt] = random_prompts([6], seed=6)
    params = SamplingParams(temperature=1.5, max_tokens=8, n=3, seed=42)
    first = engine.generate([prompt], params)[0]
    again = engine.generate([prompt], params)[0]
    assert first == again
    assert len({tuple(c) for c in first}) > 1


def test_too_long_request_is_rejected_at_submit(tiny):
    engine = make_engine(tiny, max_model_len=32)
    with pytest.raises(RequestTooLong, match="30 prompt tokens . 5 max_tokens = 35"):
        engine.add_request("long", list(range(3, 33)), SamplingParams(max_tokens=5))
    small_cache = make_engine(tiny, kv_cache_memory=4 * 2 * 2 * 2 * 16 * 4 * 4)
    with pytest.raises(RequestTooLong, match="KV cache"):
        small_cache.add_request("big", list(range(3, 13)), SamplingParams(max_tokens=10))
    assert not engine.has_unfinished_requests()


def test_stop_tokens_and_finish_reasons(tiny):
    engine = make_engine(tiny, max_model_len=20)
    [prompt] = random_prompts([8], seed=7)
    expected = hf_greedy(tiny, prompt, 12)
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=10,
                                                      stop_token_ids=[expected[2]]))
    engine.add_request("until-end", prompt, SamplingParams(temperature=0, max_tokens=None))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
    assert final["stop"].finish_reason == "stop"
    assert final["stop"].total_token_count == expected.index(expected[2]) + 1
    assert final["until-end"].finish_reason == "model_length"
    assert final["until-end"].total_token_count == 12


def test_abort_frees_blocks(tiny):
    engine = make_engine(tiny)
    engine.add_request("a", random_prompts([9])[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.stats().kv_blocks_used == 0
    assert not engine.has_unfinished_requests()


def test_everything_at_once_stays_exact(tiny):
    """Shared prefixes, n = 2, chunked prefill and preemption in one small cache: every
    choice of every request still equals transformers' greedy output."""
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4
    engine = make_engine(tiny, kv_cache_memory=10 * bytes_per_block, max_num_batched_tokens=9,
                         max_num_seqs=6)
    base = random_prompts([13], seed=20)[0]
    prompts = [base[:k] + tail for k, tail in
               zip([13, 8, 12, 4, 9, 1], random_prompts([3, 6, 1, 9, 4, 2], seed=21),
                   strict=True)]
    params = [SamplingParams(temperature=0, max_tokens=12, n=1 + i % 2)
              for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    for prompt, choices in zip(prompts, results, strict=True):
        expected = hf_greedy(tiny, prompt, 12)
        assert all(c == expected for c in choices)
    stats = engine.stats()
    assert stats.cached_prompt_tokens > 0 and stats.preemptions > 0
    assert stats.kv_blocks_used == 0


def test_abort_before_the_fork_ends_every_choice(tiny):
    engine = make_engine(tiny)
    engine.add_request("n3", random_prompts([9])[0], SamplingParams(max_tokens=5, n=3))
    engine.step()  # prefill, not yet forked
    out = engine.abort("n3")
    assert out.finished
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert {c.finish_reason for c in out.outputs} == {"abort"}
    assert engine.stats().kv_blocks_used == 0 and not engine.scheduler.has_work()


def test_tied_embeddings_through_the_engine():
    from tests.engine.conftest import make_checkpoint

    ckpt = make_checkpoint(seed=8, tie_word_embeddings=True)
    assert "lm_head.weight" in ckpt.state_dict  # transformers lists the tied tensor too
    state_dict = {k: v for k, v in ckpt.state_dict.items() if k != "lm_head.weight"}
    engine = LLMEngine(ckpt.model_config, state_dict, EngineConfig(
        dtype="float32", block_size=4, kv_cache_memory=2**20))
    run_and_check_logits(ckpt, engine, random_prompts([7, 4], seed=9), max_tokens=5)


def test_seeded_request_gives_the_same_tokens_whatever_its_batch_mates(tiny):
    [prompt] = random_prompts([7], seed=30)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, logprobs=2)
    alone = make_engine(tiny).generate([prompt], params)[0][0]
    others = random_prompts([3, 12, 5], seed=31)
    crowd = make_engine(tiny).generate(
        others[:2] + [prompt] + others[2:],
        [SamplingParams(temperature=0.8, max_tokens=15), SamplingParams(max_tokens=4),
         params, SamplingParams(temperature=0, max_tokens=9)])[2][0]
    assert alone == crowd
    assert make_engine(tiny).generate([prompt], SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=12, seed=99))[0][0] != alone


def test_logprobs_come_back_per_token(tiny):
    engine = make_engine(tiny)
    engine.add_request("lp", random_prompts([5])[0], SamplingParams(
        temperature=0, max_tokens=3, logprobs=4))
    tokens, logprobs = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].new_token_ids
            logprobs += out.outputs[0].new_logprobs
    assert [lp.token_id for lp in logprobs] == tokens
    assert all(len(lp.top) == 4 and lp.top[0][0] == lp.token_id for lp in logprobs)  # greedy
    assert all(lp.logprob <= 0 for lp in logprobs)
