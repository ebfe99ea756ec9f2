"""The engine in its own process: same outputs as in-process, grammars across the pipe, and
what a dead or unloadable engine process does to its callers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from sirocco.engine import AsyncEngine, EngineConfig, EngineDeadError, LLMEngine, SamplingParams
from sirocco.engine.process import EngineProcess, EngineSpec, EngineStartError
from sirocco.models.loader import inspect_checkpoint, load_tokenizer, load_weights
from sirocco.structured import json_schema


def spec_for(path: Path, **overrides) -> EngineSpec:
    config = EngineConfig(dtype=torch.float32, kv_cache_memory=8 * 2**20, max_model_len=256,
                          eos_token_ids=(2,))
    return EngineSpec(str(path), config, name="demo", **overrides)


@pytest.fixture(scope="module")
def process_engine(demo_model_dir: Path):
    engine = AsyncEngine(EngineProcess(spec_for(demo_model_dir)))
    engine.start()
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int],
                  params: SamplingParams) -> list[int]:
    return [t async for out in engine.generate(rid, prompt, params)
            for choice in out.outputs for t in choice.new_token_ids]


def test_the_engine_process_answers_as_the_engine_thread(demo_model_dir, process_engine):
    spec = spec_for(demo_model_dir)
    ckpt = inspect_checkpoint(demo_model_dir)
    local = AsyncEngine(LLMEngine(ckpt.config, load_weights(ckpt, torch.float32), spec.config))
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13], [1, 20]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, max_tokens=12, seed=7, ignore_eos=True)

    async def run(engine: AsyncEngine) -> list[list[int]]:
        jobs = [collect(engine, f"g{i}", p, greedy) for i, p in enumerate(prompts)]
        jobs.append(collect(engine, "s", prompts[0], seeded))
        return await asyncio.gather(*jobs)

    try:
        assert asyncio.run(run(process_engine)) == asyncio.run(run(local))
    finally:
        local.shutdown()
    stats = process_engine.stats()
    assert stats.running_seqs == 0 and stats.kv_blocks_used == 0
    assert stats.generated_tokens >= 48
    ttft, itl = process_engine.pop_latencies()
    assert len(ttft) >= 4 and len(itl) >= 44


def test_a_grammar_is_compiled_again_in_the_engine_process(demo_model_dir, process_engine):
    """The constraint crosses the pipe as grammar text and is enforced over there."""
    tokenizer = load_tokenizer(inspect_checkpoint(demo_model_dir))
    factory = json_schema({"enum": ["yes", "no"]}, True, tokenizer)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                            logits_processors=[factory()])
    prompt = [1, *tokenizer.encode_text("Yes or no?")]
    tokens = asyncio.run(collect(process_engine, "grammar", prompt, params))
    text = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
    assert json.loads(text) in ("yes", "no")


LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture
def own_engine(demo_model_dir: Path):
    """An engine process of the test's own (the test may kill it)."""
    engine = AsyncEngine(EngineProcess(spec_for(demo_model_dir)))
    yield engine
    engine.shutdown()


def test_a_killed_engine_process_fails_its_streams_and_refuses_new_work(demo_model_dir,
                                                                         own_engine):
    async def main():
        stream = own_engine.generate("doomed", [1, 5, 6], LONG)
        first = await anext(stream)
        os.kill(own_engine.core.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exit code -9"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await anext(own_engine.generate("late", [1, 5, 6], LONG))
        return first

    first = asyncio.run(asyncio.wait_for(main(), 60))
    assert first.outputs[0].new_token_ids
    assert not own_engine.is_running
    with pytest.raises(EngineDeadError):
        own_engine.add_adapter("x", demo_model_dir)  # refused at once, never a hang


def test_shutdown_ends_the_streams_and_the_process(own_engine):
    async def main():
        stream = own_engine.generate("cut", [1, 5, 6], LONG)
        await anext(stream)
        await asyncio.to_thread(own_engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), 60))
    assert own_engine.core.process.exitcode == 0 and not own_engine.is_running


def test_a_checkpoint_the_engine_process_cannot_load_is_a_start_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(EngineStartError) as caught:
        EngineProcess(spec_for(tmp_path)).wait_ready()
    assert str(caught.value)  # the loader's own reason, e.g. what is missing
