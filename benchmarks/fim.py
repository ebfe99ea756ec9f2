"""FIM latency as a code editor sees it: time to first token and total latency over HTTP.

A random ~126M-parameter Mistral checkpoint (hidden 768, 12 layers, vocab 32768) with
Mistral's v3 tokenizer (which has FIM tokens) is served by `sirocco serve`; requests go
to `POST /v1/fim/completions` with a ~200-token prompt and a ~50-token suffix, streamed,
32 generated tokens. The baseline, in the same run, is transformers `generate` on the
same FIM token ids (1 new token for the time to first token, 32 for the total). An
editor sends a request on every keystroke, so the same request is also timed again with
one more character typed (its prompt prefix is in Sirocco's prefix cache).

    python benchmarks/fim.py [--repeat 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sirocco.models.demo import mistral_common_data_file  # noqa: E402
from sirocco.tokenizers.mistral import MistralCommonTokenizer  # noqa: E402
from tests.conftest import start_server  # noqa: E402

NEW_TOKENS = 32
PROMPT = '''import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Invoice:
    number: str
    customer: str
    lines: list[tuple[str, int, float]]


def load_invoices(directory: Path) -> list[Invoice]:
    invoices = []
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        lines = [(line["item"], line["quantity"], line["price"]) for line in data["lines"]]
        invoices.append(Invoice(data["number"], data["customer"], lines))
    return invoices


def totals_by_customer(invoices: list[Invoice]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for invoice in invoices:
        '''
SUFFIX = '''
    return totals


if __name__ == "__main__":
    for customer, amount in totals_by_customer(load_invoices(Path("."))).items():
        print(customer, amount)
'''


def write_checkpoint(directory: Path, dtype: torch.dtype) -> None:
    cfg = MistralConfig(vocab_size=32768, hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                        max_position_embeddings=4096, sliding_window=None,
                        eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).to(dtype).save_pretrained(directory)
    shutil.copyfile(mistral_common_data_file("mistral_instruct_tokenizer_240323.model.v3"),
                    directory / "tokenizer.model.v3")


def sirocco_request(url: str, prompt: str) -> tuple[float, float]:
    """(time to first token, total latency) of one streamed FIM request."""
    body = {"model": "codestral-latest", "prompt": prompt, "suffix": SUFFIX, "stream": True,
            "temperature": 0, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS}
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/fim/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


@torch.inference_mode()
def hf_request(model: MistralForCausalLM, ids: list[int]) -> tuple[float, float]:
    x = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
    return ttft, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="sirocco-fim-bench-"))
    try:
        write_checkpoint(work / "model", dtype)
        tokenizer = MistralCommonTokenizer(work / "model" / "tokenizer.model.v3")
        ids = tokenizer.encode_fim(PROMPT, SUFFIX)
        print(f"prompt {len(tokenizer.encode_text(PROMPT))} tokens, suffix "
              f"{len(tokenizer.encode_text(SUFFIX))} tokens, FIM prompt {len(ids)} tokens, "
              f"{NEW_TOKENS} new tokens, dtype {args.dtype}, {torch.get_num_threads()} threads")
        server = start_server(["--model", str(work / "model"), "--served-model-name",
                               "codestral-latest", "--dtype", args.dtype], work / "data")
        try:
            sirocco_request(server.url, "# warm-up\n")
            ours, cached, theirs = [], [], []
            model = MistralForCausalLM.from_pretrained(work / "model", dtype=dtype).eval()
            hf_request(model, ids[:16])
            for i in range(args.repeat):
                # A prompt no earlier request shared (beyond its first block): uncached.
                edit = f"# revision {i} of the invoices module\n" + PROMPT
                ours.append(sirocco_request(server.url, edit))
                cached.append(sirocco_request(server.url, edit + "t"))  # one key typed
                theirs.append(hf_request(model, tokenizer.encode_fim(edit, SUFFIX)))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(rows: list[tuple[float, float]], k: int) -> float:
        return min(r[k] for r in rows) * 1000

    print(f"sirocco over HTTP (streamed): TTFT {best(ours, 0):6.0f} ms   "
          f"total {best(ours, 1):6.0f} ms")
    print(f"  next keystroke (prefix cached): TTFT {best(cached, 0):6.0f} ms   "
          f"total {best(cached, 1):6.0f} ms")
    print(f"transformers generate (in process): TTFT {best(theirs, 0):6.0f} ms   "
          f"total {best(theirs, 1):6.0f} ms")
    print(f"ratio transformers / sirocco: TTFT {best(theirs, 0) / best(ours, 0):.2f}x  "
          f"total {best(theirs, 1) / best(ours, 1):.2f}x  "
          f"(next keystroke TTFT {best(theirs, 0) / best(cached, 0):.2f}x)")


if __name__ == "__main__":
    main()
