"""Weight-only quantized linear layers on stock PyTorch kernels (`--quantization`).

At one stream a decode step is bound by reading the weights: SmolLM2-135M reads ~540 MB
a token in float32. `Int4Linear` keeps 4-bit weights with a scale and a zero per group
of `group_size` inputs (w = (q - 8) * scale + zero, the convention of
`torch.ops.aten._weight_int4pack_mm_for_cpu`); `Int8Linear` keeps 8-bit weights with one
scale per output (w = q * scale, `torch.ops.aten._weight_int8pack_mm`). Both keep the
layer's interface: float rows in, float rows out, no bias.

The kernels run in bfloat16: with float32 activations the CPU kernels are ~10x slower
than a packed float32 matmul (measured), with bfloat16 several times faster. So a layer
rounds its input rows to bfloat16 for the matmul and hands the result back in the input's
dtype; the model's residual stream, norms and attention keep their own precision.

A GGUF file's Q4_1 blocks (w = d * q + m per block of 32, d and m float16) map onto the
int4 layout exactly, up to the kernel's bfloat16 scale and zero: scale = d,
zero = m + 8 d (`Int4Linear.from_q4_1`). Any other float weight is quantized group-wise
from its min and max (`Int4Linear.from_float`), which gives back the same blocks for a
file that llama.cpp quantized without an importance matrix.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4")
# How each mode quantizes the output head (the tied head of SmolLM2 is the largest matrix
# of the model, 49152 x 576). Not to int4: the head is the layer most sensitive to its
# weights' precision (llama.cpp files keep it at 6 or 8 bits: SmolLM2's Q4_1 file has it in
# Q8_0), and int4 re-quantized it made SmolLM2 answer "L'Étoile" for the capital of France.
HEAD_MODE = {"int8": "int8", "int4": "int8"}
INT4_GROUP_SIZE = 32
_KERNEL_DTYPE = torch.bfloat16
_INNER_K_TILES = 2  # int4 packing parameter of the CPU kernel (and CUDA's tinygemm)


class Int4Linear(nn.Module):
    """A bias-free linear layer with 4-bit weights, group-wise asymmetric.

    q [out, in] integers 0..15; scales, zeros [out, in // group_size].
    """

    input_dtype = _KERNEL_DTYPE  # rows in any other dtype are rounded to it first

    def __init__(self, q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.from_q4_1_blocks = False
        if self.in_features % group_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of the "
                             f"group size {group_size}")
        self.register_buffer("packed", _pack_int4(q.to(torch.int32)))
        # The kernel wants [in // group_size, out, 2] in the activations' dtype.
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1)
                             .transpose(0, 1).to(_KERNEL_DTYPE).contiguous())

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        """Quantize [out, in] weights: each group of inputs spans its min to its max in 15 steps."""
        out_features, in_features = weight.shape
        w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = (high - low) / 15
        step = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        q = ((w - low.unsqueeze(-1)) / step).round().clamp(0, 15).reshape(weight.shape)
        return cls(q, scales, low + 8 * scales, group_size)

    @classmethod
    def from_q4_1(cls, d: Tensor, m: Tensor, q: Tensor) -> Int4Linear:
        """From GGUF Q4_1 blocks: w = d * q + m per block of 32 inputs.

        d, m [out, in // 32] (float16 in the file); q [out, in] integers 0..15.
        """
        group_size = q.shape[1] // d.shape[1]
        d, m = d.float(), m.float()
        layer = cls(q, d, m + 8 * d, group_size)
        layer.from_q4_1_blocks = True
        return layer

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
        if self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                           self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")


def _pack_int4(q: Tensor) -> Tensor:
    if q.device.type == "cuda":
        # tinygemm takes two values a byte, the even one in the high nibble.
        pairs = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
        return torch.ops.aten._convert_weight_to_int4pack(
            (pairs[..., 0] << 4) | pairs[..., 1], _INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)


class Int8Linear(nn.Module):
    """A bias-free linear layer with 8-bit weights and one scale per output (symmetric)."""

    input_dtype = _KERNEL_DTYPE

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(_KERNEL_DTYPE).contiguous())

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        step = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        return cls((w / step).round().clamp(-127, 127), scales)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# GGUF blocks, one row of the raw tensor per output feature.
Q4_1_BLOCK_BYTES = 20  # d (float16), m (float16), 16 bytes of 32 nibbles
Q4_1_BLOCK = 32


# A state dict may carry a weight's raw Q4_1 rows beside it, under its name + this suffix
# (`load_weights(..., q4_1_blocks=True)`); the engine takes them for int4 layers.
Q4_1_KEY_SUFFIX = ":q4_1"


def split_q4_1_blocks(state_dict: dict[str, Tensor]
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the weights, the raw Q4_1 rows by weight name) of a state dict."""
    weights, blocks = {}, {}
    for key, tensor in state_dict.items():
        if key.endswith(Q4_1_KEY_SUFFIX):
            blocks[key.removesuffix(Q4_1_KEY_SUFFIX)] = tensor
        else:
            weights[key] = tensor
    return weights, blocks


# `auto` follows a GGUF file's precision class only once a quantized mode has been measured
# to keep the default model's plain-fact answers and to be faster (README, "Quantization").
AUTO_FOLLOWS_FILE = False


def file_precision_class(tensor_types: list[str] | None) -> str:
    """The mode a checkpoint's own precision calls for: a GGUF file with 2- to 4-bit
    tensors -> "int4", with 5- to 8-bit ones -> "int8", float only (or not a GGUF
    file: `tensor_types` None) -> "none"."""
    types = [t.upper() for t in tensor_types or []]
    if any(t.startswith(("Q2", "Q3", "Q4", "IQ")) for t in types):
        return "int4"
    if any(t.startswith(("Q5", "Q6", "Q8")) for t in types):
        return "int8"
    return "none"


def resolve_quantization(mode: str, tensor_types: list[str] | None = None) -> str:
    """The layers' quantization for `--quantization` and the checkpoint's tensor types
    (a converted GGUF file's, None for safetensors).

    "auto" is `file_precision_class` where `AUTO_FOLLOWS_FILE`, else "none" (logged).
    """
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}; use {', '.join(QUANTIZATIONS)}")
    if mode != "auto":
        return mode
    file_class = file_precision_class(tensor_types)
    if AUTO_FOLLOWS_FILE or file_class == "none":
        return file_class
    logger.info("quantization auto: none, though the file's class is %s: on SmolLM2 that "
                "mode loses plain-fact answers or speed (README, Quantization); pass "
                "--quantization %s to serve it", file_class, file_class)
    return "none"


def unpack_q4_1(raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Raw Q4_1 rows [out, blocks * 20] uint8 -> (d, m [out, blocks] float16, q [out, in]).

    In a block, byte j holds element j in its low nibble and element j + 16 in its high one.
    """
    blocks = raw.reshape(raw.shape[0], -1, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    nibbles = blocks[..., 4:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(raw.shape[0], -1)
    return d, m, q


def dequantize_q4_1(raw: Tensor) -> Tensor:
    """The float32 weights [out, in] that raw Q4_1 rows stand for."""
    d, m, q = unpack_q4_1(raw)
    w = q.float().reshape(*d.shape, Q4_1_BLOCK) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return w.reshape(q.shape)


def can_quantize(in_features: int, out_features: int, mode: str) -> bool:
    """Whether the kernels of `mode` take a layer of this shape."""
    if mode == "int4":  # the CPU packing wants out % 16, CUDA's in % 32
        return in_features % INT4_GROUP_SIZE == 0 and out_features % 16 == 0
    # The int8 CPU kernel gave garbage (or crashed) for in % 16 != 0 (torch 2.13).
    return mode == "int8" and in_features % 16 == 0


def quantize_linear(weight: Tensor, mode: str, q4_1_parts: list[Tensor] | None = None
                    ) -> nn.Module:
    """The quantized layer of `mode` ("int8" or "int4") for a float weight [out, in].

    `q4_1_parts`: the raw Q4_1 rows the weight was dequantized from (the parts of a fused
    layer, in output order); int4 then adopts them as they are instead of re-quantizing.
    """
    if mode == "int8":
        return Int8Linear.from_float(weight)
    if mode != "int4":
        raise ValueError(f"unknown quantization {mode!r}")
    if q4_1_parts:
        d, m, q = (torch.cat(t) for t in zip(*map(unpack_q4_1, q4_1_parts), strict=True))
        if q.shape == weight.shape and d.shape[1] * Q4_1_BLOCK == weight.shape[1]:
            return Int4Linear.from_q4_1(d.to(weight.device), m.to(weight.device),
                                        q.to(weight.device))
        logger.warning("Q4_1 blocks of shape %s do not fit a weight of shape %s: "
                       "re-quantizing", tuple(q.shape), tuple(weight.shape))
    return Int4Linear.from_float(weight)


def quantize_linear_layers(model: nn.Module, mode: str,
                           q4_1_blocks: dict[str, Tensor] | None = None,
                           head: str | None = "same") -> tuple[int, int]:
    """Swap a `MistralModel`'s linear layers for quantized ones.

    Returns (layers swapped, of which adopted the file's Q4_1 blocks).

    Run it before `pack_linear_layers` and `attach_lora`: the layers it leaves (a shape
    the kernels refuse, the output head with `head=None`) are packed as usual, and LoRA
    wraps quantized and plain layers alike. `q4_1_blocks`: raw Q4_1 rows by Hugging Face
    weight name (`model.layers.0.self_attn.q_proj.weight`, ...) from a GGUF file.
    `head`: the mode of the output head ("same": `mode`; None: left as it is).
    """
    from sirocco.models.lora import FUSED_PARTS
    from sirocco.models.mistral import Linear

    blocks = q4_1_blocks or {}
    targets: list[tuple[nn.Module, str, list[str], str]] = []
    for i, layer in enumerate(model.layers):
        for name, parts in FUSED_PARTS.items():
            owner_name, attr = name.split(".")
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            targets.append((getattr(layer, owner_name), attr, names, mode))
    if head is not None:
        targets.append((model, "lm_head", ["lm_head.weight"], mode if head == "same" else head))
    swapped = adopted = 0
    for owner, attr, names, layer_mode in targets:
        child = getattr(owner, attr)
        if not isinstance(child, Linear) or not can_quantize(child.in_features,
                                                             child.out_features, layer_mode):
            continue
        parts = [blocks[n] for n in names] if all(n in blocks for n in names) else None
        layer = quantize_linear(child.weight, layer_mode, parts)
        setattr(owner, attr, layer)
        swapped += 1
        adopted += getattr(layer, "from_q4_1_blocks", False)
    return swapped, adopted
