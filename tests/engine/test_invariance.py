"""Exactness: a greedy answer does not depend on the prefix cache, the prefill chunking or
the batch; and a request that could run away is refused at submit time."""

from __future__ import annotations

import pytest

from sirocco.engine import RequestTooLong, SamplingParams
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
