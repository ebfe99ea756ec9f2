"""Prompt logprobs: each prompt token after the first, given the tokens before it, against
transformers; across prefill chunks, a warm prefix cache, preemption and forks."""

from __future__ import annotations

import pytest
import torch

from sirocco.engine import EngineConfig, LLMEngine, SamplingParams
from sirocco.engine.outputs import CompletionOutput, TokenLogprob
from sirocco.engine.scheduler import ScheduledBatch
from tests.engine.conftest import random_prompts

ATOL = 1e-4


def make_engine(ckpt, **overrides) -> LLMEngine:
    kwargs = dict(dtype="float32", block_size=4, kv_cache_memory=2**20, max_num_seqs=16,
                  max_num_batched_tokens=256)
    kwargs.update(overrides)
    return LLMEngine(ckpt.model_config, ckpt.state_dict, EngineConfig(**kwargs))


def run(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams,
        preempt_after_steps: int | None = None) -> tuple[list[CompletionOutput], int]:
    """Every CompletionOutput of the request, and the prompt tokens it found cached."""
    engine.add_request(rid, prompt, params)
    outputs: list[CompletionOutput] = []
    cached = -1
    steps = 0
    while rid in engine.requests:
        for out in engine.step():
            outputs += out.outputs
            cached = out.num_cached_tokens
        steps += 1
        if steps == preempt_after_steps:
            for seq in list(engine.scheduler.running):  # as the scheduler does
                engine.scheduler.running.remove(seq)
                engine.scheduler._preempt(seq, ScheduledBatch())
    return outputs, cached


def delivered(outputs: list[CompletionOutput], index: int = 0) -> list[TokenLogprob]:
    """The prompt logprobs of one choice: delivered exactly once, with its first token."""
    mine = [o for o in outputs if o.index == index]
    carrying = [o for o in mine if o.prompt_logprobs is not None]
    assert len(carrying) == 1
    assert carrying[0] is mine[0] and mine[0].new_token_ids
    return carrying[0].prompt_logprobs


def check_against_transformers(ckpt, prompt: list[int], got: list[TokenLogprob], k: int
                               ) -> None:
    with torch.inference_mode():
        ref = torch.log_softmax(ckpt.hf_model(torch.tensor([prompt])).logits[0].float(), -1)
    assert [e.token_id for e in got] == prompt[1:]  # one entry per token after the first
    want = ref[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor([e.logprob for e in got]), want, atol=ATOL,
                               rtol=0)
    top_vals, top_ids = ref[:-1].topk(k, dim=-1)
    for entry, ids, vals in zip(got, top_ids.tolist(), top_vals, strict=True):
        assert len(entry.top) == k
        torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), vals,
                                   atol=ATOL, rtol=0)
        # ids may only differ where two alternatives tie within the tolerance
        for (tid, _), want_id, want_lp in zip(entry.top, ids, vals.tolist(), strict=True):
            assert tid == want_id or abs(ref[got.index(entry), tid].item() - want_lp) < ATOL


def test_chunked_prompt_matches_transformers(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=7)
    [prompt] = random_prompts([23], seed=40)  # 4 chunks of at most 7 tokens
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3)
    outputs, _ = run(engine, "chunked", prompt, params)
    check_against_transformers(tiny, prompt, delivered(outputs), k=3)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cached_prompt_is_recomputed_and_still_registered(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=8)
    [prompt] = random_prompts([21], seed=41)
    plain = SamplingParams(temperature=0, max_tokens=2)
    _, cached = run(engine, "warm", prompt, plain)
    assert cached == 0
    asking = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    outputs, cached = run(engine, "asks", prompt, asking)
    assert cached == 0  # no prefix-cache hit: every prompt position went through the model
    check_against_transformers(tiny, prompt, delivered(outputs), k=2)
    _, cached = run(engine, "again", prompt, plain)
    assert cached == 20  # the blocks are still shared with requests that do not ask


def test_preemption_mid_prefill_records_each_position_once(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=5)
    [prompt] = random_prompts([19], seed=42)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    outputs, _ = run(engine, "preempted", prompt, params, preempt_after_steps=2)
    assert engine.scheduler.num_preemptions == 1
    check_against_transformers(tiny, prompt, delivered(outputs), k=1)


def test_preemption_after_delivery_sends_nothing_again(tiny):
    engine = make_engine(tiny)
    [prompt] = random_prompts([9], seed=43)
    params = SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=0)
    outputs, _ = run(engine, "late", prompt, params, preempt_after_steps=2)
    got = delivered(outputs)
    assert all(e.top == [] for e in got)
    check_against_transformers(tiny, prompt, got, k=0)


def test_n_choices_each_get_the_prompt_logprobs(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=6)
    [prompt] = random_prompts([14], seed=44)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=3, n=2, prompt_logprobs=2)
    outputs, _ = run(engine, "forks", prompt, params)
    for index in range(2):
        check_against_transformers(tiny, prompt, delivered(outputs, index), k=2)


def test_off_by_default_and_validated(tiny):
    engine = make_engine(tiny)
    [prompt] = random_prompts([6], seed=45)
    outputs, _ = run(engine, "off", prompt, SamplingParams(temperature=0, max_tokens=2))
    assert all(o.prompt_logprobs is None for o in outputs)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
