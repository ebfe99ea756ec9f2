"""Exactness: a greedy answer does not depend on the prefix cache, the prefill chunking or
the batch; and a request that could run away is refused at submit time."""

from __future__ import annotations

import functools

import pytest
import torch

from sirocco.engine import RequestTooLong, SamplingParams
from sirocco.models import paged_attention
from sirocco.models.kernels import bf16_dot_products
from tests.engine.conftest import random_prompts
from tests.engine.test_engine import make_engine


def test_min_tokens_beyond_the_context_is_refused_naming_it(tiny):
    engine = make_engine(tiny, max_model_len=32)
    with pytest.raises(RequestTooLong, match="10 prompt tokens . 40 min_tokens = 50"):
        engine.add_request("long", list(range(3, 13)), SamplingParams(min_tokens=40))
    assert not engine.has_unfinished_requests()
    engine.add_request("fits", list(range(3, 13)), SamplingParams(min_tokens=20, max_tokens=22))


def _greedy(engine, prompts, **kw):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, **kw)
    return engine.generate(prompts, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_is_the_same_cold_warm_chunked_and_batched(tiny, dtype):
    prompts = random_prompts([9, 23, 14, 31], seed=3)
    alone = [_greedy(make_engine(tiny, dtype=dtype), [p])[0] for p in prompts]
    warm_engine = make_engine(tiny, dtype=dtype)
    _greedy(warm_engine, prompts)
    warm = [_greedy(warm_engine, [p])[0] for p in prompts]
    batched = _greedy(make_engine(tiny, dtype=dtype), prompts)
    chunked = _greedy(make_engine(tiny, dtype=dtype, max_num_batched_tokens=8), prompts)
    assert warm == alone
    assert batched == alone
    assert chunked == alone


def _logprobs(engine, prompts, params, before=()):
    """Tokens and every logprob (chosen and top 3, generated and prompt) of each prompt;
    `before` prompts are submitted first and decoding when the prompts arrive."""
    for i, other in enumerate(before):
        engine.add_request(f"other-{i}", other, SamplingParams(temperature=0, max_tokens=40))
    for _ in range(3 if before else 0):
        engine.step()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p-{i}", prompt, params)
    got: dict[str, list] = {f"p-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for choice in out.outputs if out.request_id in got else ():
                for lp in (choice.prompt_logprobs or []) + (choice.new_logprobs or []):
                    got[out.request_id].append((lp.token_id, lp.logprob, lp.top))
    return [got[f"p-{i}"] for i in range(len(prompts))]


@pytest.mark.skipif(not paged_attention.available(torch.float32, torch.device("cpu")),
                    reason="no C compiler for the batch-invariant attention kernel")
@pytest.mark.parametrize("ckpt, dtype", [("tiny", "float32"), ("tiny_windowed", "float32"),
                                         ("tiny", "bfloat16")])
def test_logprobs_are_bitwise_the_same_cold_warm_chunked_and_batched(ckpt, dtype, request):
    """With the invariant kernels (CPU; float32, or bfloat16 where the CPU has bfloat16
    dot products) every logprob is bitwise the same: prompt recomputed or from the cache,
    prefilled whole or 5 tokens a step, alone or beside sequences that are decoding."""
    if dtype == "bfloat16" and not bf16_dot_products():
        pytest.skip("no bfloat16 dot products: bfloat16 layers run oneDNN")
    ckpt = request.getfixturevalue(ckpt)
    engine = functools.partial(make_engine, ckpt, dtype=dtype)

    prompts = random_prompts([9, 23, 14, 31], seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    others = random_prompts([17, 6, 28], seed=5)
    alone = [_logprobs(engine(), [p], params)[0] for p in prompts]
    warm_engine = engine()
    _logprobs(warm_engine, prompts, params)
    assert _logprobs(warm_engine, prompts, params) == alone  # prefixes now in the cache
    assert warm_engine.block_manager.prefix_hits > 0
    assert _logprobs(engine(), prompts, params) == alone  # one batch
    assert _logprobs(engine(max_num_batched_tokens=5), prompts, params) == alone
    assert _logprobs(engine(), prompts, params, before=others) == alone
    # The prompt recomputed for its logprobs: the same answer, and the same prompt logprobs
    # whatever the chunking and the batch.
    recompute = SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=3)
    recomputed = _logprobs(engine(), prompts, recompute)
    assert [r[-12:] for r in recomputed] == alone
    assert _logprobs(engine(max_num_batched_tokens=5), prompts, recompute,
                     before=others) == recomputed


@pytest.mark.skipif(not paged_attention.available(torch.float32, torch.device("cpu")),
                    reason="no C compiler for Sirocco's kernels")
@pytest.mark.parametrize("ckpt, quantization, dtype", [
    ("tiny", "int4", "float32"), ("tiny_windowed", "int8", "float32"),
    ("tiny", "int4", "bfloat16")])
def test_the_decoder_stack_computes_bitwise_what_the_layers_compute(ckpt, quantization, dtype,
                                                                     request):
    """Every decoder layer of a step in one C call (`models/decoder_stack.py`) gives the
    logprobs of the layers run one by one from Python, bit for bit: prefilled whole or 5
    tokens a step, beside other sequences."""
    ckpt = request.getfixturevalue(ckpt)
    engine = functools.partial(make_engine, ckpt, dtype=dtype, quantization=quantization)
    assert engine().runner.model.decoder_stack is not None
    assert engine(decoder_stack=False).runner.model.decoder_stack is None
    prompts = random_prompts([9, 23, 14, 31], seed=6)
    others = random_prompts([17, 6, 28], seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2)
    for chunking in ({}, {"max_num_batched_tokens": 5}):
        stacked = _logprobs(engine(**chunking), prompts, params, before=others)
        assert stacked == _logprobs(engine(decoder_stack=False, **chunking), prompts, params,
                                    before=others)


def test_a_batch_with_an_adapter_runs_the_layers_from_python(tiny):
    """The stack has no LoRA: a step where an adapter is active runs the layers (and their
    adapters) from Python, so the adapter's answer is the same either way and differs
    from the base model's."""
    g = torch.Generator().manual_seed(8)
    config = tiny.model_config
    sizes = {"attention.wqkv": (config.hidden_size,
                                (config.num_attention_heads + 2 * config.num_key_value_heads)
                                * config.head_dim),
             "attention.wo": (config.num_attention_heads * config.head_dim, config.hidden_size),
             "feed_forward.w_gate_up": (config.hidden_size, 2 * config.intermediate_size),
             "feed_forward.w_down": (config.intermediate_size, config.hidden_size)}
    adapter = {f"layers.{i}.{name}": (torch.randn(4, d_in, generator=g) * 0.3,
                                      torch.randn(d_out, 4, generator=g) * 0.3)
               for i in range(config.num_hidden_layers) for name, (d_in, d_out) in sizes.items()}
    prompt = random_prompts([11], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=1)

    def answers(stack: bool) -> tuple[list, list]:
        engine = make_engine(tiny, quantization="int4", decoder_stack=stack)
        engine.add_adapter("a", adapter)
        got: dict[str, list] = {"base": [], "adapted": []}
        engine.add_request("base", prompt, params)
        engine.add_request("adapted", prompt, params, adapter="a")
        while engine.has_unfinished_requests():
            for out in engine.step():
                for choice in out.outputs:
                    got[out.request_id] += [(lp.token_id, lp.logprob)
                                            for lp in choice.new_logprobs]
        return got["base"], got["adapted"]

    base, adapted = answers(stack=True)
    assert (base, adapted) == answers(stack=False)
    assert adapted != base


def _reference(q, k_cache, v_cache, table, pos, window):
    """Attention of one query at `pos` in float64, from the slots of its block table."""
    block = k_cache.shape[1]
    lo = 0 if window is None else max(0, pos - window + 1)
    slots = torch.tensor([table[j // block] * block + j % block for j in range(lo, pos + 1)])
    k = k_cache.flatten(0, 1)[slots].double()  # [n, kv_heads, d]
    v = v_cache.flatten(0, 1)[slots].double()
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * q.shape[-1] ** -0.5
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v)


@pytest.mark.skipif(not paged_attention.available(torch.float32, torch.device("cpu")),
                    reason="no C compiler: the model keeps PyTorch's attention")
# Blocks of 16 hold whole groups of 16 keys, which the kernel reads in place; blocks of 8
# make it gather them first.
@pytest.mark.parametrize("head_dim, window, block, cache", [
    (64, None, 16, "float32"), (48, 37, 16, "float32"), (64, 37, 8, "float32"),
    (64, 37, 16, "bfloat16"), (48, None, 8, "bfloat16")])
def test_the_kernel_matches_attention_and_ignores_the_batch(head_dim, window, block, cache):
    """Against float64 attention over the same cache (a bfloat16 cache is read exactly:
    its values widen to float32 without rounding)."""
    torch.manual_seed(0)
    heads, kv_heads, split = 6, 2, 16 // block
    dtype = getattr(torch, cache)
    k_cache = torch.randn(40 * split, block, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(40 * split, block, kv_heads, head_dim).to(dtype)
    tables = [[7, 3, 30, 12, 5, 22, 9, 1], [2, 11, 4], [39, 38, 37, 36, 35, 34, 33, 32, 31]]
    tables = [[b * split + i for b in table for i in range(split)] for table in tables]
    # a prompt of 70 tokens from position 50 (three chunks), one decode at 20, one at 140
    starts, counts = [50, 20, 140], [70, 1, 1]
    layout = paged_attention.PagedLayout.build(tables, starts, counts)
    assert layout.chunks.tolist() == [0, 32, 64, 70, 71, 72]
    q = torch.randn(72, heads, head_dim)
    keys = paged_attention.transposed_keys(k_cache)  # the layout the engine's cache keeps
    out = paged_attention.paged_attention(q, keys, v_cache, layout, window)
    rows = [(0, p) for p in range(50, 120)] + [(1, 20), (2, 140)]
    for t, (seq, pos) in enumerate(rows):
        expected = _reference(q[t], k_cache, v_cache, tables[seq], pos, window)
        assert (out[t].double() - expected).abs().max() < 1e-5, (t, seq, pos)
    # each query alone, and the prompt as one chunk of one token at a time: bitwise the same
    for t, (seq, pos) in enumerate(rows):
        alone = paged_attention.PagedLayout.build([tables[seq]], [pos], [1])
        single = paged_attention.paged_attention(q[t:t + 1], keys, v_cache, alone, window)
        assert torch.equal(single[0], out[t]), (t, seq, pos)
