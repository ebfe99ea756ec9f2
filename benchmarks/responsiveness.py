"""Does the server stay responsive while it generates? `GET /health` latency over HTTP.

The engine's step loop runs in its own thread, so the HTTP event loop should answer
quickly even while the engine is busy. This starts `sirocco serve` with the demo
checkpoint, measures `/health` latency idle (the baseline), then again while 16 streamed
generations run, and prints both and their ratio. The issue's target: under 50 ms.

    python benchmarks/responsiveness.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sirocco.models.demo import write_demo_model  # noqa: E402
from tests.conftest import start_server  # noqa: E402

STREAMS = 16


def health_latencies(url: str, seconds: float) -> list[float]:
    out = []
    with httpx.Client() as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            client.get(url + "/health").raise_for_status()
            out.append(time.perf_counter() - t)
            time.sleep(0.02)
    return out


def generate(url: str, index: int) -> None:
    body = {"model": "mistral-tiny", "stream": True, "max_tokens": 400, "min_tokens": 400,
            "messages": [{"role": "user", "content": f"Tell story number {index}"}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for _ in r.iter_lines():
            pass


def report(name: str, values: list[float]) -> float:
    values = sorted(values)
    p50, p99 = statistics.median(values), values[int(len(values) * 0.99) - 1]
    print(f"{name:<34} n={len(values):4d}  p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms")
    return p50


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = write_demo_model(Path(tmp) / "model")
        server = start_server(["--model", str(model), "--served-model-name", "mistral-tiny"],
                              Path(tmp) / "data")
        try:
            idle = report("GET /health, idle", health_latencies(server.url, 3))
            threads = [threading.Thread(target=generate, args=(server.url, i))
                       for i in range(STREAMS)]
            start = time.monotonic()
            for t in threads:
                t.start()
            time.sleep(1)  # let every stream start
            busy = report(f"GET /health, {STREAMS} streams running",
                          health_latencies(server.url, 5))
            running = sum(t.is_alive() for t in threads)
            for t in threads:
                t.join()
            print(f"{running} of {STREAMS} streams were still running when the busy "
                  f"measurement ended; all finished after {time.monotonic() - start:.1f} s")
        finally:
            server.stop()
    print(f"busy / idle median: {busy / idle:.1f}x; target: busy median under 50 ms "
          f"({'met' if busy < 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
