"""Bursts past capacity: how many requests are admitted, refused (429) and completed?

Starts `sirocco serve` (the default models, or the demo checkpoint with `--demo`), then
fires bursts of 100, 400 and 1,000 chat requests at once (short max_tokens) and prints,
per burst: admitted / refused / completed counts, latency percentiles of the admitted
requests, the server's peak RSS and `/health` latency during the burst. The baseline,
measured in the same run: one request and `/health` on the idle server, and the ratios.

    python benchmarks/overload.py                      # SmolLM2, server defaults
    python benchmarks/overload.py --max-waiting 16     # shorter runs
    python benchmarks/overload.py --demo --bursts 100,400
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sirocco.models.demo import write_demo_model  # noqa: E402
from tests.conftest import Server, start_server  # noqa: E402


def body(index: int, max_tokens: int) -> dict:
    return {"model": "mistral-tiny", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say hello to person number {index}."}]}


class Sampler:
    """In a thread while a burst runs: /health latency every 100 ms and the server's
    RSS (with its children) every 50 ms."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.health: list[float] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe), threading.Thread(target=self._rss)]

    def __enter__(self) -> Sampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _probe(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=120) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                client.get("/health")
                self.health.append(time.perf_counter() - start)
                self._stop.wait(0.1)

    def _rss(self) -> None:
        process = psutil.Process(self.server.process.pid)
        while not self._stop.is_set():
            try:
                rss = process.memory_info().rss + sum(
                    c.memory_info().rss for c in process.children(recursive=True))
            except psutil.Error:
                rss = 0
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(0.05)


async def burst(url: str, size: int, max_tokens: int) -> list[tuple[int, float]]:
    """(status, seconds) of `size` requests sent at once; status 0 for a transport error."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def one(index: int) -> tuple[int, float]:
            start = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body(index, max_tokens))
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            return status, time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(size)))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true",
                        help="serve the random demo checkpoint instead of SmolLM2")
    parser.add_argument("--bursts", default="100,400,1000")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.bursts.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        serve_args: list[str] = []
        if args.demo:
            model = write_demo_model(Path(tmp) / "model")
            serve_args += ["--model", str(model), "--served-model-name", "mistral-tiny"]
        if args.max_waiting is not None:
            serve_args += ["--max-waiting", str(args.max_waiting)]
        if args.max_num_seqs is not None:
            serve_args += ["--max-num-seqs", str(args.max_num_seqs)]
        server = start_server(serve_args, Path(tmp) / "data", timeout=900)
        try:
            model = "demo checkpoint" if args.demo else "SmolLM2-135M"
            flags = " ".join(serve_args[4:] if args.demo else serve_args) or "default flags"
            run(server, sizes, args.max_tokens, f"{model}; {flags}")
        finally:
            server.stop()


def run(server: Server, sizes: list[int], max_tokens: int, label: str) -> None:
    print(f"sirocco serve ({label}), max_tokens {max_tokens}")
    with Sampler(server) as idle:
        time.sleep(2)
    idle_health = statistics.median(idle.health)
    (status, alone), = asyncio.run(burst(server.url, 1, max_tokens))
    assert status == 200, status
    print(f"baseline, idle: one request {ms(alone)}, /health p50 {ms(idle_health)}, "
          f"RSS {idle.peak_rss / 2**20:.0f} MiB")
    print(f"{'burst':>6} {'admitted':>8} {'refused':>8} {'completed':>9} {'other':>6}  "
          f"{'p50':>10} {'p90':>10} {'p99':>10}  {'peak RSS':>9}  {'/health p50':>11} "
          f"{'max':>10}  wall")
    for size in sizes:
        start = time.perf_counter()
        with Sampler(server) as sampler:
            results = asyncio.run(burst(server.url, size, max_tokens))
        wall = time.perf_counter() - start
        refused = sum(s == 429 for s, _ in results)
        admitted = [t for s, t in results if s not in (429, 0)]
        completed = sum(s == 200 for s, _ in results)
        other = len(results) - refused - completed
        health = sampler.health or [float("nan")]
        print(f"{size:6d} {len(admitted):8d} {refused:8d} {completed:9d} {other:6d}  "
              f"{ms(percentile(admitted, 0.5))} {ms(percentile(admitted, 0.9))} "
              f"{ms(percentile(admitted, 0.99))}  {sampler.peak_rss / 2**20:6.0f} MiB  "
              f"{ms(statistics.median(health))} {ms(max(health))}  {wall:5.1f} s")
        print(f"{'':6} admitted p50 / one idle request: "
              f"{percentile(admitted, 0.5) / alone:.1f}x; /health max / idle p50: "
              f"{max(health) / idle_health:.0f}x")
        time.sleep(1)


if __name__ == "__main__":
    main()
