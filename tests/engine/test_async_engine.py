"""The AsyncEngine: concurrent streams, aborts, stats, errors at submit."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from sirocco.engine import (
    AsyncEngine,
    EngineConfig,
    RequestOutput,
    RequestTooLong,
    SamplingParams,
    build_engine,
)
from tests.engine.conftest import hf_greedy, random_prompts


@pytest.fixture
def engine(tiny):
    config = EngineConfig(dtype="float32", block_size=4, kv_cache_memory=2**20,
                          max_model_len=64, max_num_batched_tokens=32)
    eng = build_engine(tiny.model_config, tiny.state_dict, config)
    yield eng
    eng.shutdown()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams
                  ) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, params)]


async def collect_on(engine: AsyncEngine, rid: str, prompt: list[int],
                     params: SamplingParams, adapter: str) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, params, adapter=adapter)]


def test_eight_concurrent_greedy_requests_match_transformers(tiny, engine):
    prompts = random_prompts([3, 7, 11, 5, 16, 9, 2, 13], seed=10)
    params = SamplingParams(temperature=0, max_tokens=10)

    async def main():
        return await asyncio.gather(*(collect(engine, f"r{i}", p, params)
                                      for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results, strict=True):
        tokens = [t for o in outs for t in o.outputs[0].new_token_ids]
        assert tokens == hf_greedy(tiny, prompt, 10)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].prompt_token_count == len(prompt)
    stats = engine.stats()
    assert stats.generated_tokens == 80 and stats.running_seqs == 0
    ttft, itl = engine.pop_latencies()
    assert len(ttft) == 8 and len(itl) == 72


def test_abort_mid_stream_ends_with_abort_and_frees_blocks(engine):
    async def main():
        seen = []
        async for out in engine.generate("slow", random_prompts([6])[0],
                                         SamplingParams(max_tokens=40, ignore_eos=True)):
            seen.append(out)
            if len(seen) == 3:
                engine.abort("slow")
        return seen

    seen = asyncio.run(main())
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert engine.engine.stats().kv_blocks_used == 0


def test_leaving_the_stream_early_aborts(engine):
    async def main():
        stream = engine.generate("left", random_prompts([6])[0], SamplingParams(max_tokens=40))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_too_long_is_raised_at_submit(engine):
    async def main():
        async for _ in engine.generate("x", list(range(3, 63)), SamplingParams(max_tokens=10)):
            pass

    with pytest.raises(RequestTooLong, match="context length"):
        asyncio.run(main())


def test_event_loop_stays_responsive_while_generating(tiny, engine):
    """The step loop runs in its own thread: the server's loop keeps answering."""
    prompts = random_prompts([20] * 16, seed=11)
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def main():
        lags = []

        async def probe(done: asyncio.Event):
            while not done.is_set():
                t = asyncio.get_running_loop().time()
                await asyncio.sleep(0.005)
                lags.append(asyncio.get_running_loop().time() - t - 0.005)

        done = asyncio.Event()
        prober = asyncio.create_task(probe(done))
        await asyncio.gather(*(collect(engine, f"s{i}", p, params)
                               for i, p in enumerate(prompts)))
        done.set()
        await prober
        return lags

    lags = asyncio.run(main())
    # The loop kept running between steps (how fast it answers is measured by
    # benchmarks/responsiveness.py, not asserted here).
    assert len(lags) > 5


def test_a_failing_sequence_fails_its_request_alone(engine):
    """A step that raises for one sequence fails that request; the others finish and the
    loop keeps serving."""
    from sirocco.engine import RequestFailed

    def broken(output, logits):
        raise RuntimeError("grammar exploded")

    good = SamplingParams(temperature=0, max_tokens=5)
    bad = SamplingParams(max_tokens=3, logits_processors=[broken])

    async def main():
        return await asyncio.gather(
            *(collect(engine, f"ok{i}", p, good) for i, p in enumerate(random_prompts([4, 6, 8])))
            , collect(engine, "boom", [5, 6, 7], bad), return_exceptions=True)

    *oks, boom = asyncio.run(main())
    assert isinstance(boom, RequestFailed) and "grammar exploded" in str(boom)
    for outs in oks:
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert engine.is_running and engine.failed_requests == 1
    again = asyncio.run(collect(engine, "after", [5, 6, 7], good))
    assert again[-1].outputs[0].finish_reason == "length"
    assert engine.engine.stats().kv_blocks_used == 0


def test_a_huge_top_k_fails_its_request_not_the_engine(engine):
    from sirocco.engine import RequestFailed

    async def main():
        return await asyncio.gather(
            collect(engine, "k", [5, 6, 7], SamplingParams(top_k=10**19, max_tokens=3)),
            collect(engine, "fine", [8, 9], SamplingParams(temperature=0, max_tokens=3)),
            return_exceptions=True)

    bad, fine = asyncio.run(main())
    assert isinstance(bad, RequestFailed)
    assert fine[-1].outputs[0].finish_reason == "length"


def test_removing_an_adapter_in_use_lets_its_requests_finish(engine, tmp_path):
    """The slot stays until its last sequence ends; the engine never sees a missing slot."""
    from sirocco.engine import UnknownAdapter

    mc = engine.engine.runner.model_config
    d_out = (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim
    weights = {f"layers.{i}.attention.wqkv": (torch.randn(2, mc.hidden_size) * 0.1,
                                              torch.randn(d_out, 2) * 0.1)
               for i in range(mc.num_hidden_layers)}
    lora = engine.engine
    lora.add_adapter("a", weights)
    lora.add_adapter("b", weights)
    engine.adapters.update({"a", "b"})  # (raw weights: installed behind the client's back)
    params = SamplingParams(max_tokens=20, ignore_eos=True)

    async def main():
        stream = engine.generate("on-a", [5, 6, 7], params, adapter="a")
        outs = [await anext(stream)]
        other = asyncio.create_task(collect_on(engine, "on-b", [5, 6, 8], params, "b"))
        await asyncio.to_thread(engine.remove_adapter, "a")
        with pytest.raises(UnknownAdapter):
            await anext(engine.generate("late", [5, 6], params, adapter="a"))
        outs += [o async for o in stream]
        return outs, await other

    outs, other = asyncio.run(main())
    assert outs[-1].outputs[0].finish_reason == "length"
    assert other[-1].outputs[0].finish_reason == "length"
    assert "a" not in lora.adapters and not lora.retired_slots
    assert set(lora.runner.lora.adapters) == {lora.adapters["b"]}


def test_admission_past_max_waiting_is_refused(tiny):
    from sirocco.engine import EngineOverloaded

    config = EngineConfig(dtype="float32", block_size=4, kv_cache_memory=2**20,
                          max_model_len=64, max_num_seqs=2)
    eng = build_engine(tiny.model_config, tiny.state_dict, config, max_waiting=1)
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(eng, f"r{i}", [5, 6, 7], params)
                                      for i in range(6)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    refused = [r for r in results if isinstance(r, EngineOverloaded)]
    assert len(refused) == 3 and all(r.retry_after >= 1 for r in refused)
    assert eng.rejected_requests == 3
    assert all(r[-1].outputs[0].finish_reason == "length" for r in results
               if not isinstance(r, BaseException))


def test_admission_is_bounded_by_default(tiny):
    """Without --max-waiting, twice the batch the engine holds may wait: --max-num-seqs,
    or fewer where the KV cache has fewer blocks than that."""
    from sirocco.engine import EngineOverloaded

    config = EngineConfig(dtype="float32", block_size=4, kv_cache_memory=2**20,
                          max_model_len=64, max_num_seqs=3)
    eng = build_engine(tiny.model_config, tiny.state_dict, config)
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(eng, f"r{i}", [5, 6, 7], params)
                                      for i in range(12)), return_exceptions=True)

    try:
        assert eng.engine.runner.num_blocks > 3
        assert eng.max_waiting == 6 and eng.max_in_flight == 9
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    assert sum(isinstance(r, EngineOverloaded) for r in results) == 3
    small = EngineConfig(dtype="float32", block_size=4, kv_cache_memory=2**14,
                         max_model_len=16, max_num_seqs=64)
    eng = build_engine(tiny.model_config, tiny.state_dict, small)
    try:
        assert eng.max_waiting == 2 * eng.engine.runner.num_blocks < 2 * 64
    finally:
        eng.shutdown()


def test_request_timeout_ends_the_request_and_frees_it(tiny):
    from sirocco.engine import RequestTimedOut

    config = EngineConfig(dtype="float32", block_size=4, kv_cache_memory=2**20,
                          max_model_len=512)
    eng = build_engine(tiny.model_config, tiny.state_dict, config, request_timeout=0.3)
    try:
        with pytest.raises(RequestTimedOut):
            asyncio.run(collect(eng, "long", [5, 6, 7],
                                SamplingParams(max_tokens=500, ignore_eos=True)))
        assert eng.timed_out_requests == 1
        for _ in range(100):
            if not eng.engine.has_unfinished_requests():
                break
            time.sleep(0.01)
        assert eng.engine.stats().kv_blocks_used == 0
    finally:
        eng.shutdown()
