"""Weight-only quantized linear layers (`--quantization`).

At one stream a decode step is bound by reading the weights: SmolLM2-135M reads ~540 MB
a token in float32. `Int4Linear` keeps 4-bit weights q (0..15) with a scale and an offset per
group of 32 inputs of an output (w = q * scale + offset: GGUF's Q4_1); `Int8Linear` keeps
8-bit weights (-127..127) with a scale per group of 32 (w = q * scale: GGUF's Q8_0). Both
keep the layer's interface: float rows in, float rows out, no bias.

On a CPU they run Sirocco's kernel (`csrc/qmatmul.c`): float32 rows, each weight
dequantized to float32 from the file's own numbers (q * scale + offset rounded once), one
order of sums per output. So a layer made from a GGUF file's own blocks computes what the
float32 model dequantized from that file computes, up to the last bit of a weight and the
order of its sums, and a row's result does not depend on the batch.
In a bfloat16 model, int4 layers take bfloat16 rows instead where the CPU has bfloat16 dot
products (`csrc/bf16_matmul.c`: the same weights, each group's sum in float32, the result
rounded to bfloat16; 1.5x faster than float32 rows at 16 rows).
A file's Q4_1 blocks are adopted as they are (`Int4Linear.from_q4_1`); other float weights are
quantized group-wise from their min and max, or their largest magnitude for 8 bits
(`from_float`), which gives back the very blocks of a file that llama.cpp quantized to Q8_0,
and of Q4_1 without an importance matrix.

Elsewhere (CUDA, or no C compiler) PyTorch's kernels serve: int4 on
`aten._weight_int4pack_mm` (tinygemm; `_for_cpu` on a CPU), whose rows, scales and offsets
are bfloat16, and int8 on the weights dequantized at each call.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sirocco.models.kernels import TILE as _TILE
from sirocco.models.kernels import bf16_dot_products, library, matmul

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4")
# How each mode quantizes the output head (the tied head of SmolLM2 is the largest matrix
# of the model, 49152 x 576). Not to int4: the head is the layer most sensitive to its
# weights' precision (llama.cpp files keep it at 6 or 8 bits: SmolLM2's Q4_1 file has it in
# Q8_0), and int4 re-quantized it made SmolLM2 answer "L'Étoile" for the capital of France.
HEAD_MODE = {"int8": "int8", "int4": "int8"}
GROUP_SIZE = 32  # inputs per scale, both modes (the kernel's GROUP)
_TORCH_DTYPE = torch.bfloat16  # PyTorch's int4 kernels take bfloat16 rows
_INNER_K_TILES = 2  # int4 packing parameter of PyTorch's kernels


def head_mode(mode: str, rows: torch.dtype) -> str | None:
    """The output head's mode for layers of `mode` in a model of dtype `rows` (None: left
    unquantized). `HEAD_MODE`, except in bfloat16 where the CPU has bfloat16 dot products:
    there the plain head is faster than int8 weights on float32 rows (SmolLM2's: 16 rows
    2.7 ms against 4.7, 64 rows 8.9 against 17.9; one row 1.35 against 1.1)."""
    if rows == torch.bfloat16 and bf16_dot_products():
        return None
    return HEAD_MODE[mode]


def _own_kernel(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _tiles(t: Tensor) -> Tensor:
    """[out, n] -> [out / 16, n, 16]: each tile's 16 outputs side by side."""
    out, n = t.shape
    return t.reshape(out // _TILE, _TILE, n).transpose(1, 2).contiguous()


class Int4Linear(nn.Module):
    """A bias-free linear layer with 4-bit weights, group-wise asymmetric.

    q [out, in] integers 0..15; scales, offsets [out, in // group_size]: w = q * scale + offset.
    """

    def __init__(self, q: Tensor, scales: Tensor, offsets: Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.from_q4_1_blocks = False
        if self.in_features % group_size or self.out_features % _TILE:
            raise ValueError(f"a {self.out_features} x {self.in_features} weight does not split "
                             f"into groups of {group_size} inputs and tiles of {_TILE} outputs")
        self.own_kernel = _own_kernel(q.device) and group_size == GROUP_SIZE
        self.input_dtype = torch.float32 if self.own_kernel else _TORCH_DTYPE
        if self.own_kernel:
            pairs = _tiles(q.to(torch.uint8)).view(self.out_features // _TILE, -1, 2, _TILE)
            self.register_buffer("packed", (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).contiguous())
            self.register_buffer("scales", _tiles(scales.float()))
            self.register_buffer("offsets", _tiles(offsets.float()))
            return
        self.register_buffer("packed", _pack_int4(q.to(torch.int32)))
        # PyTorch's convention: w = (q - 8) * scale + zero, as [in // group_size, out, 2].
        zeros = offsets.float() + 8 * scales.float()
        self.register_buffer("scales_and_zeros", torch.stack([scales.float(), zeros], dim=-1)
                             .transpose(0, 1).to(_TORCH_DTYPE).contiguous())

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int = GROUP_SIZE) -> Int4Linear:
        """Quantize [out, in] weights: each group of inputs spans its min to its max in 15 steps."""
        out_features, in_features = weight.shape
        w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = (high - low) / 15
        step = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        q = ((w - low.unsqueeze(-1)) / step).round().clamp(0, 15).reshape(weight.shape)
        return cls(q, scales, low, group_size)

    @classmethod
    def from_q4_1(cls, d: Tensor, m: Tensor, q: Tensor) -> Int4Linear:
        """From GGUF Q4_1 blocks: w = d * q + m per block of 32 inputs.

        d, m [out, in // 32] (float16 in the file); q [out, in] integers 0..15.
        """
        layer = cls(q, d.float(), m.float(), q.shape[1] // d.shape[1])
        layer.from_q4_1_blocks = True
        return layer

    def take_bfloat16_rows(self) -> bool:
        """Multiply bfloat16 rows with the CPU's bfloat16 dot products (`csrc/bf16_matmul.c`:
        the same weights, each group's sum in float32, the result rounded to bfloat16) where
        the CPU has them; returns whether it does. For a bfloat16 model: float32 rows cost
        twice the multiply-adds. The scales and offsets are then kept in float16 (a Q4_1
        block's own: its weights unchanged), a quarter fewer bytes to read a token."""
        if self.own_kernel and bf16_dot_products() and self.input_dtype != torch.bfloat16:
            self.input_dtype = torch.bfloat16
            self.scales, self.offsets = self.scales.half(), self.offsets.half()
        return self.input_dtype == torch.bfloat16

    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel and self.input_dtype == torch.bfloat16:
            return matmul("sirocco_q4_bf16_matmul", x, (self.packed, self.scales, self.offsets),
                          self.out_features, torch.bfloat16)
        if self.own_kernel:
            return matmul("sirocco_qmatmul", x, (self.packed, self.scales, self.offsets),
                          self.out_features, torch.float32, 4).to(x.dtype)
        rows = x.reshape(-1, self.in_features).to(_TORCH_DTYPE)
        if self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                           self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={'own' if self.own_kernel else 'torch'}")


def _pack_int4(q: Tensor) -> Tensor:
    if q.device.type == "cuda":
        # tinygemm takes two values a byte, the even one in the high nibble.
        pairs = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
        return torch.ops.aten._convert_weight_to_int4pack(
            (pairs[..., 0] << 4) | pairs[..., 1], _INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)


class Int8Linear(nn.Module):
    """A bias-free linear layer with 8-bit weights, a scale per group of 32 inputs (symmetric).

    q [out, in] integers -127..127; scales [out, in // 32]: w = q * scale.
    """

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP_SIZE or self.out_features % _TILE:
            raise ValueError(f"a {self.out_features} x {self.in_features} weight does not split "
                             f"into groups of {GROUP_SIZE} inputs and tiles of {_TILE} outputs")
        self.own_kernel = _own_kernel(q.device)
        self.input_dtype = torch.float32
        q = q.to(torch.int8)
        self.register_buffer("q", _tiles(q) if self.own_kernel else q.contiguous())
        self.register_buffer("scales", _tiles(scales.float()) if self.own_kernel
                             else scales.float().contiguous())

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        """Quantize [out, in] weights: each group of 32 inputs in 127 steps of its largest
        magnitude (a Q8_0 block's own scale, recovered exactly from its dequantized weights)."""
        out_features, in_features = weight.shape
        w = weight.detach().float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        scales = w.abs().amax(dim=-1) / 127
        step = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        q = (w / step).round().clamp(-127, 127).reshape(weight.shape)
        return cls(q, scales)

    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            return matmul("sirocco_qmatmul", x, (self.q, self.scales, self.scales),
                          self.out_features, torch.float32, 8).to(x.dtype)
        weight = (self.q.float().view(self.out_features, -1, GROUP_SIZE)
                  * self.scales.unsqueeze(-1)).view(self.out_features, self.in_features)
        return F.linear(x.float(), weight).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={'own' if self.own_kernel else 'torch'}")


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

    "auto" is `file_precision_class`: a GGUF file is served at the precision it was made
    in (from its own Q4_1 blocks where it has them), a float checkpoint in float.
    """
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}; use {', '.join(QUANTIZATIONS)}")
    if mode != "auto":
        return mode
    picked = file_precision_class(tensor_types)
    if picked != "none":
        logger.info("quantization auto: %s, the precision class of the file's tensors", picked)
    return picked


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
    # groups of 32 inputs, tiles of 16 outputs (PyTorch's CPU int4 packing wants out % 16 too)
    return mode in ("int4", "int8") and in_features % GROUP_SIZE == 0 and out_features % _TILE == 0


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
                           head: str | None = "same",
                           rows: torch.dtype = torch.float32) -> tuple[int, int]:
    """Swap a `MistralModel`'s linear layers for quantized ones.

    Returns (layers swapped, of which adopted the file's Q4_1 blocks).

    Run it before `pack_linear_layers` and `attach_lora`: the layers it leaves (a shape
    the kernels refuse, the output head with `head=None`) are packed as usual, and LoRA
    wraps quantized and plain layers alike. `q4_1_blocks`: raw Q4_1 rows by Hugging Face
    weight name (`model.layers.0.self_attn.q_proj.weight`, ...) from a GGUF file.
    `head`: the mode of the output head ("same": `mode`; None: left as it is). `rows`: the
    model's dtype; in bfloat16, int4 layers take bfloat16 rows where the CPU has bfloat16
    dot products (`Int4Linear.take_bfloat16_rows`).
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
        if rows == torch.bfloat16 and isinstance(layer, Int4Linear):
            layer.take_bfloat16_rows()
        setattr(owner, attr, layer)
        swapped += 1
        adopted += getattr(layer, "from_q4_1_blocks", False)
    return swapped, adopted
