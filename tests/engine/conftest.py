"""Tiny random Mistral checkpoints, built by the tests themselves."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from sirocco.models.config import ModelConfig


@dataclass
class TinyCheckpoint:
    hf_model: MistralForCausalLM
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]


def make_checkpoint(seed: int = 0, **overrides) -> TinyCheckpoint:
    """A 2-layer, hidden-64 random Mistral in float32, weights drawn with std 0.3.

    The large std keeps logits far from flat, so greedy choices are stable.
    """
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        sliding_window=None, initializer_range=0.3, tie_word_embeddings=False,
        eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    kwargs.update(overrides)
    cfg = MistralConfig(**kwargs)
    torch.manual_seed(seed)
    hf = MistralForCausalLM(cfg).float().eval()
    return TinyCheckpoint(hf, ModelConfig.from_hf(cfg.to_dict()),
                          {k: v.clone() for k, v in hf.state_dict().items()})


@pytest.fixture(scope="session")
def tiny() -> TinyCheckpoint:
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_windowed() -> TinyCheckpoint:
    return make_checkpoint(seed=1, sliding_window=5)


class LogitsRecorder:
    """A logits processor that keeps a copy of the raw logits of every step."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.rows.append(logits.clone())
        return logits


def hf_greedy(ckpt: TinyCheckpoint, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = ckpt.hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_next_token_logits(ckpt: TinyCheckpoint, prompt: list[int], output: list[int]
                         ) -> torch.Tensor:
    """transformers' logits for each generated position: [len(output), vocab]."""
    with torch.inference_mode():
        logits = ckpt.hf_model(torch.tensor([prompt + output])).logits[0]
    return logits[len(prompt) - 1: len(prompt) + len(output) - 1]


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
