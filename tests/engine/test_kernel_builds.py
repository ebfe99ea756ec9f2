"""Sirocco's kernels compute the same bits whatever vectors the build uses: the library
built for this CPU (`-march=native`: AVX-512, or AVX2 with its own 256-bit code paths) and one
built for plain x86-64 (SSE2, the portable C) give bitwise the same logprobs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sirocco.engine import SamplingParams
from sirocco.models import paged_attention
from tests.engine.conftest import make_checkpoint, random_prompts
from tests.engine.test_engine import make_engine
from tests.engine.test_invariance import _logprobs

ROOT = Path(__file__).resolve().parents[2]


def logprobs_of_every_mode() -> dict[str, list]:
    """Greedy tokens and logprobs (generated and prompt, top 3) of the tiny checkpoint in
    each quantization mode and dtype on Sirocco's kernels."""
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2)
    got = {}
    for quantization in ("int4", "int8"):
        for dtype in ("float32", "bfloat16"):
            engine = make_engine(make_checkpoint(), dtype=dtype, quantization=quantization)
            assert engine.runner.model.decoder_stack is not None
            got[f"{quantization} {dtype}"] = _logprobs(engine, random_prompts([9, 23, 31], seed=4),
                                                       params)
    return json.loads(json.dumps(got))  # as the other process's answer reads


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds only")
@pytest.mark.skipif(not paged_attention.available(torch.float32, torch.device("cpu")),
                    reason="no C compiler for Sirocco's kernels")
def test_a_portable_build_computes_the_bits_of_this_cpus_build(tmp_path):
    script = ("import json, sys; from tests.engine.test_kernel_builds import "
              "logprobs_of_every_mode as f; json.dump(f(), sys.stdout)")
    env = {**os.environ, "SIROCCO_KERNEL_MARCH": "x86-64",
           "SIROCCO_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    portable = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600, check=True)
    assert list(tmp_path.glob("sirocco-kernels-*.so")), "the portable library was not built"
    assert json.loads(portable.stdout) == logprobs_of_every_mode()
