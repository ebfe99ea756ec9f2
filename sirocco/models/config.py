"""The architecture of a Mistral-family decoder, read from either checkpoint layout.

One dataclass describes every checkpoint Sirocco serves: Hugging Face `config.json`
(Mistral and Llama architectures) and Mistral's native `params.json` both map onto it,
so the torch module and the engine never ask which layout a model came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class ModelConfig:
    """Hyper-parameters of a Mistral-architecture decoder (Llama is the same, no window)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    architecture: str = "mistral"

    @property
    def num_parameters(self) -> int:
        """Weights of the decoder (embeddings, attention, MLP, norms, output head)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` of a Mistral or Llama model."""
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        archs = config.get("architectures") or []
        arch = "llama" if any("Llama" in a for a in archs) else config.get("model_type", "mistral")
        rope_theta = config.get("rope_theta")
        rope_scaling = config.get("rope_scaling")
        # transformers 5 nests theta (and scaling) under `rope_parameters`.
        rope_parameters = config.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            sliding_window=config.get("sliding_window"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            architecture=arch,
        )

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> ModelConfig:
        """Build from Mistral's native `params.json` (mistral-inference layout)."""
        heads = params["n_heads"]
        dim = params["dim"]
        window = params.get("sliding_window")
        if isinstance(window, list):  # per-layer windows; we support one window for all layers
            window = window[0]
        return cls(
            vocab_size=params["vocab_size"],
            hidden_size=dim,
            intermediate_size=params["hidden_dim"],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=heads,
            num_key_value_heads=params.get("n_kv_heads") or heads,
            head_dim=params.get("head_dim") or dim // heads,
            rms_norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_position_embeddings=params.get("max_seq_len")
            or params.get("max_position_embeddings")
            or 32768,
            sliding_window=window,
            tie_word_embeddings=bool(params.get("tied_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `MistralConfig`-style dict (what `config.json` holds)."""
        d = asdict(self)
        d.pop("architecture")
        d["model_type"] = "mistral"
        d["architectures"] = ["MistralForCausalLM"]
        d["hidden_act"] = "silu"
        return d
