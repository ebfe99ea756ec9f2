"""The demo checkpoint: a tiny random-weight Mistral model with Mistral's v3 tokenizer.

It is the offline fixture for every Mistral-tokenizer path (control tokens, tool calls,
FIM): its text is meaningless. Weights are drawn from a fixed seed with std 0.3 rather
than transformers' 0.02, so that logits are not flat and LoRA can teach it something
within seconds (see DESIGN.md). The same call always writes the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sirocco.models.config import ModelConfig

DEMO_CONFIG = ModelConfig(
    vocab_size=32768,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    max_position_embeddings=8192,
    sliding_window=None,
    tie_word_embeddings=False,
)
DEMO_SEED = 20240323
DEMO_STD = 0.3
TOKENIZER_FILE = "tokenizer.model.v3"


def mistral_common_data_file(name: str) -> Path:
    """A tokenizer file that ships inside the mistral-common package."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def demo_state_dict(config: ModelConfig = DEMO_CONFIG, seed: int = DEMO_SEED) -> dict:
    """Random weights in Hugging Face naming, drawn in a fixed order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * DEMO_STD

    weights = {"model.embed_tokens.weight": draw(config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = draw(q_out, h)
        weights[p + "self_attn.k_proj.weight"] = draw(kv_out, h)
        weights[p + "self_attn.v_proj.weight"] = draw(kv_out, h)
        weights[p + "self_attn.o_proj.weight"] = draw(h, q_out)
        weights[p + "mlp.gate_proj.weight"] = draw(inter, h)
        weights[p + "mlp.up_proj.weight"] = draw(inter, h)
        weights[p + "mlp.down_proj.weight"] = draw(h, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(h)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(h)
    weights["model.norm.weight"] = torch.ones(h)
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = draw(config.vocab_size, h)
    return {name: t.contiguous() for name, t in weights.items()}


def write_demo_model(directory: Path) -> Path:
    """Write the demo checkpoint (config.json, model.safetensors, tokenizer) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = DEMO_CONFIG.to_hf()
    config.update(torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(demo_state_dict(), directory / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(
        mistral_common_data_file("mistral_instruct_tokenizer_240323.model.v3"),
        directory / TOKENIZER_FILE,
    )
    (directory / "README.md").write_text(
        "# Sirocco demo model\n\nA tiny Mistral-architecture checkpoint with random weights "
        f"(seed {DEMO_SEED}) and Mistral's v3 tokenizer, written by `sirocco demo-model`. "
        "Its text is meaningless: it exists to exercise Mistral-tokenizer code paths offline.\n"
    )
    return directory


def ensure_demo_model(directory: Path) -> Path:
    """The demo checkpoint at `directory`, written once (atomically) if missing."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists() and (directory / TOKENIZER_FILE).exists():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_demo_model(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory
