"""The AsyncEngine: concurrent streams, aborts, stats, errors at submit."""

from __future__ import annotations

import asyncio

import pytest

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


def test_a_failing_step_fails_the_streams_not_the_server(engine):
    from sirocco.engine import EngineDeadError

    def broken(output, logits):
        raise RuntimeError("grammar exploded")

    async def main():
        async for _ in engine.generate("boom", [5, 6, 7], SamplingParams(
                max_tokens=3, logits_processors=[broken])):
            pass

    with pytest.raises(EngineDeadError, match="grammar exploded"):
        asyncio.run(main())
    with pytest.raises(EngineDeadError):
        asyncio.run(main())
    assert engine.engine.stats().kv_blocks_used == 0
