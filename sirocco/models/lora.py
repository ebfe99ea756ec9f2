"""LoRA adapters served on top of their base model, several in one batch.

A fine-tuned model is a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`)
on a base model whose weights are never copied. Each linear layer of the decoder is
wrapped in a `LoRALinear` that adds, to the rows of the packed batch that belong to
sequences of an adapter, that adapter's low-rank delta `x @ A.T @ B.T` (the scale folded
into B). Rows of the base model pay nothing; a batch mixing the base model and several
adapters runs one forward.

PEFT trains q/k/v and gate/up separately, while our decoder fuses them: the fused
layer's A stacks the parts' A matrices and its B is their block diagonal, which gives
exactly the concatenation of the parts' deltas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from sirocco.models.config import ModelConfig

#: Fused layer of our decoder -> the PEFT module names it is made of, in output order.
FUSED_PARTS = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w_down": ("mlp.down_proj",),
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)


class LoRAError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


# Adapter weights: "layers.{i}.{fused layer}" -> (A [rank, in], B [out, rank] with scale).
AdapterWeights = dict[str, tuple[Tensor, Tensor]]


def _part_sizes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every PEFT target module."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }


def load_peft_adapter(path: Path, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> AdapterWeights:
    """Read a PEFT LoRA adapter and fuse it for our decoder's layers."""
    path = Path(path)
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"{path} is not a readable PEFT adapter: {exc}") from None
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: only LoRA adapters are supported, not "
                        f"{adapter_config.get('peft_type')}")
    if adapter_config.get("use_dora") or adapter_config.get("modules_to_save"):
        raise LoRAError(f"{path}: DoRA and modules_to_save are not supported")
    if adapter_config.get("bias", "none") != "none":
        raise LoRAError(f"{path}: LoRA biases are not supported")
    rank = int(adapter_config["r"])
    alpha = float(adapter_config.get("lora_alpha", rank))
    scale = alpha / rank ** 0.5 if adapter_config.get("use_rslora") else alpha / rank

    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAError(f"{path}: unsupported adapter tensor {key}")
        layer, module, which = match.groups()
        parts.setdefault((int(layer), module), {})[which] = tensor
    sizes = _part_sizes(config)
    fused: AdapterWeights = {}
    for i in range(config.num_hidden_layers):
        for name, modules in FUSED_PARTS.items():
            present = [m for m in modules if (i, m) in parts]
            if not present:
                continue
            a_blocks, b_blocks = [], []
            for module in modules:
                d_in, d_out = sizes[module]
                ab = parts.get((i, module))
                if ab is None:  # this part was not trained: a zero delta
                    a_blocks.append(torch.zeros(rank, d_in))
                    b_blocks.append(torch.zeros(d_out, rank))
                    continue
                a, b = ab["A"].float(), ab["B"].float() * scale
                if a.shape != (a.shape[0], d_in) or b.shape != (d_out, a.shape[0]):
                    raise LoRAError(f"{path}: layer {i} {module} has shapes {tuple(a.shape)} / "
                                    f"{tuple(b.shape)}, which do not fit this base model")
                a_blocks.append(a)
                b_blocks.append(b)
            fused[f"layers.{i}.{name}"] = (
                torch.cat(a_blocks).to(device=device, dtype=dtype).contiguous(),
                torch.block_diag(*b_blocks).to(device=device, dtype=dtype).contiguous(),
            )
    if not fused:
        raise LoRAError(f"{path}: the adapter has no LoRA weights for this model's layers")
    return fused


@dataclass
class LoRAContext:
    """The adapters a model can apply, and which rows of the current batch use which.

    Slot 0 is the base model. `set_batch` is called before every forward.
    """

    adapters: dict[int, AdapterWeights] = field(default_factory=dict)
    rows: list[tuple[int, Tensor]] = field(default_factory=list)  # (slot, row indices)

    def set_batch(self, token_slots: list[int], device: torch.device) -> None:
        """`token_slots[t]`: the adapter slot of packed token t (0: base model)."""
        self.rows = []
        if not self.adapters or not any(token_slots):
            return
        slots = torch.tensor(token_slots)
        for slot in sorted(set(token_slots) - {0}):
            index = (slots == slot).nonzero().flatten().to(device)
            self.rows.append((slot, index))

    def clear(self) -> None:
        self.rows = []


class LoRALinear(nn.Module):
    """A base linear layer plus the LoRA deltas of the adapters active in this batch."""

    def __init__(self, base: nn.Module, name: str, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        for slot, index in self.context.rows:
            weights = self.context.adapters[slot].get(self.name)
            if weights is None:
                continue
            a, b = weights
            rows = x.index_select(0, index).to(a.dtype)
            y.index_add_(0, index, ((rows @ a.T) @ b.T).to(y.dtype))
        return y


def attach_lora(model: nn.Module) -> LoRAContext:
    """Wrap every linear layer of a `MistralModel`'s decoder layers; return the context."""
    context = LoRAContext()
    for i, layer in enumerate(model.layers):
        for name in FUSED_PARTS:
            owner_name, attr = name.split(".")
            owner = getattr(layer, owner_name)
            setattr(owner, attr, LoRALinear(getattr(owner, attr), f"layers.{i}.{name}", context))
    return context
