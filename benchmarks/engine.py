"""Engine throughput and latency against transformers `generate`, in the same run.

A random ~126M-parameter Mistral checkpoint (hidden 768, 12 layers, 12 heads, 4 KV heads,
MLP 2048, vocab 32768) in bfloat16; 128-token prompts, 128 generated tokens (every
request runs to max_tokens). Prints:

- decode tokens/s at concurrency 1, 4, 16, 64 (our engine, all requests submitted at
  once; decode = tokens after each request's first / time after the last first token),
  end-to-end tokens/s, and transformers `generate` at batch 1 and a static batch of 16;
- time to first token (TTFT) of one 128-token request, and prefill time for 512 tokens;
- TTFT of a request whose 1,000-token prefix is cached vs the same request uncached;
- on a CPU, what the batch-invariant attention kernel costs (README "Exactness"): one
  layer's attention over the paged cache, the kernel against PyTorch's SDPA (which must
  first gather each sequence's blocks), float32, for a 512- and a 2,048-token prefill and
  16 decodes.

    python benchmarks/engine.py            # the full run (several minutes on 2 cores)
    python benchmarks/engine.py --quick    # 32 generated tokens, fewer concurrencies
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

from sirocco.engine import EngineConfig, LLMEngine, SamplingParams
from sirocco.models import paged_attention
from sirocco.models.config import ModelConfig


def checkpoint(dtype: torch.dtype, device: str) -> tuple[MistralForCausalLM, ModelConfig]:
    cfg = MistralConfig(vocab_size=32768, hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                        max_position_embeddings=4096, sliding_window=None,
                        initializer_range=0.02, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return model, ModelConfig.from_hf(cfg.to_dict())


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32768, (length,), generator=g).tolist() for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], new_tokens: int, device: str) -> float:
    """Tokens/s of transformers `generate` on a static batch (end to end)."""
    ids = torch.tensor(batch, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    sync(device)
    t = time.perf_counter()
    model.generate(ids, **kwargs)
    sync(device)
    return len(batch) * new_tokens / (time.perf_counter() - t)


@torch.inference_mode()
def hf_prefill(model, length: int, device: str) -> float:
    ids = torch.tensor(prompts(1, length, seed=9), device=device)
    model(ids[:, :16])
    sync(device)
    t = time.perf_counter()
    model(ids)
    sync(device)
    return time.perf_counter() - t


def engine_run(engine: LLMEngine, batch: list[list[int]], new_tokens: int
               ) -> tuple[float, float, float]:
    """(decode tokens/s, end-to-end tokens/s, mean TTFT in s) for requests sent at once."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"bench-{start}-{i}", p, params)
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter())
    end = time.perf_counter()
    last_first = max(first.values())
    decode = len(batch) * (new_tokens - 1) / (end - last_first) if end > last_first else 0.0
    ttft = sum(v - start for v in first.values()) / len(first)
    return decode, len(batch) * new_tokens / (end - start), ttft


def ttft_one(engine: LLMEngine, prompt: list[int]) -> float:
    engine.add_request(f"ttft-{time.perf_counter()}", prompt, SamplingParams(max_tokens=1))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, concurrency 1, 16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each measurement, the baseline and ours back to back; "
                        "the best throughput of each is shown, and the ratio is the median "
                        "of the back-to-back pairs (the machine is shared: a pair shares "
                        "its noise)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    new_tokens = 32 if args.quick else 128
    concurrencies = [1, 16] if args.quick else [1, 4, 16, 64]
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"prompt=128 new_tokens={new_tokens}")

    hf, model_config = checkpoint(dtype, args.device)
    state_dict = {k: v for k, v in hf.state_dict().items()}
    kv_bytes_per_token = 2 * 12 * 4 * 64 * dtype.itemsize  # (k, v) x layers x kv heads x dim
    engine = LLMEngine(model_config, state_dict, EngineConfig(
        dtype=dtype, device=args.device, max_model_len=2048, max_num_seqs=64,
        max_num_batched_tokens=2048, kv_cache_memory=64 * 384 * kv_bytes_per_token))
    engine.generate(prompts(2, 16), SamplingParams(temperature=0, max_tokens=4))  # warm-up

    baselines = {1: 0.0, 16: 0.0}
    pair_ratios: dict[int, list[float]] = {1: [], 16: []}
    results: dict[int, tuple[float, float, float]] = {}
    for r in range(args.repeat):
        for c in concurrencies:
            base = None
            if c in baselines:
                base = hf_generate(hf, prompts(c, 128, seed=c), new_tokens, args.device)
                baselines[c] = max(baselines[c], base)
            fresh = prompts(c, 128, seed=1000 * r + c)  # new prompts: no prefix-cache hits
            run = engine_run(engine, fresh, new_tokens)
            if base:
                pair_ratios[c].append(run[1] / base)
            if c not in results or run[1] > results[c][1]:
                results[c] = run
    hf1, hf16 = baselines[1], baselines[16]
    print(f"transformers generate: batch 1 {hf1:7.1f} tok/s   static batch 16 {hf16:7.1f} tok/s")
    for c in concurrencies:
        decode, e2e, ttft = results[c]
        ratios = sorted(pair_ratios.get(c, []))
        ratio = (f"  e2e vs transformers {statistics.median(ratios):4.2f}x (pairs "
                 f"{ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else "")
        print(f"sirocco concurrency {c:3d}: decode {decode:7.1f} tok/s  end-to-end {e2e:7.1f} "
              f"tok/s  mean TTFT {ttft * 1000:6.0f} ms{ratio}")

    ttft128 = ttft_one(engine, prompts(1, 128, seed=7)[0])
    ours512 = ttft_one(engine, prompts(1, 512, seed=8)[0])
    hf512 = hf_prefill(hf, 512, args.device)
    print(f"TTFT 128-token prompt: {ttft128 * 1000:.0f} ms")
    print(f"prefill 512 tokens: sirocco {ours512 * 1000:.0f} ms, transformers forward "
          f"{hf512 * 1000:.0f} ms ({hf512 / ours512:.2f}x)")

    prefix = prompts(1, 1000, seed=11)[0]
    uncached = ttft_one(engine, prefix + prompts(1, 24, seed=12)[0])
    cached = ttft_one(engine, prefix + prompts(1, 24, seed=13)[0])
    print(f"TTFT 1,024-token prompt: uncached {uncached * 1000:.0f} ms, 1,000-token prefix "
          f"cached {cached * 1000:.0f} ms ({cached / uncached:.2f} of uncached; target <= 0.20)")
    print(f"prefix cache hit rate over the run: {engine.stats().prefix_cache_hit_rate:.2f}")
    if paged_attention.available(torch.float32, torch.device(args.device)):
        attention_cost()


def best_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def attention_case(counts: list[int], length: int) -> tuple[float, float]:
    """Milliseconds of one layer's attention (12 heads, 4 KV heads, head size 64, blocks of
    16, float32) for sequences of `length` tokens whose last `counts[i]` are new: the
    invariant kernel, and SDPA over the same blocks, gathered."""
    heads, kv_heads, dim, block = 12, 4, 64, 16
    blocks = length // block
    k_cache = torch.randn(len(counts) * blocks + 1, block, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    tables = [list(range(1 + i * blocks, 1 + (i + 1) * blocks)) for i in range(len(counts))]
    layout = paged_attention.PagedLayout.build(tables, [length - n for n in counts], counts)
    q = torch.randn(sum(counts), heads, dim)
    index = torch.tensor(tables)

    def sdpa() -> torch.Tensor:
        k = k_cache[index].flatten(1, 2).transpose(1, 2)  # [seqs, kv_heads, length, dim]
        v = v_cache[index].flatten(1, 2).transpose(1, 2)
        qs = q.view(len(counts), -1, heads, dim).transpose(1, 2)
        return F.scaled_dot_product_attention(qs, k, v, is_causal=counts[0] > 1,
                                              enable_gqa=True)

    keys = paged_attention.transposed_keys(k_cache)  # the kernel's layout of the same keys
    ours = best_ms(lambda: paged_attention.paged_attention(q, keys, v_cache, layout, None))
    return ours, best_ms(sdpa)


def attention_cost() -> None:
    torch.manual_seed(0)
    for name, counts, length in [("prefill 512", [512], 512), ("prefill 2048", [2048], 2048),
                                 ("16 decodes at 256", [1] * 16, 256)]:
        ours, base = attention_case(counts, length)
        print(f"attention {name}: invariant kernel {ours:6.2f} ms, PyTorch SDPA {base:6.2f} ms "
              f"({ours / base:.2f}x its time)")


if __name__ == "__main__":
    main()
