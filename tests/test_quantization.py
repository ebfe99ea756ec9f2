"""Weight-only quantized linear layers (`--quantization`) against float references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from sirocco.models.config import ModelConfig
from sirocco.models.kernels import bf16_dot_products
from sirocco.models.lora import attach_lora, load_peft_adapter
from sirocco.models.mistral import MistralModel
from sirocco.models.quantized import (
    Int4Linear,
    Int8Linear,
    dequantize_q4_1,
    file_precision_class,
    quantize_linear,
    quantize_linear_layers,
    resolve_quantization,
)
from tests.test_lora import TARGETS, peft_logits, save_adapter, tiny_base


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def weights_and_rows(out_features: int = 96, in_features: int = 128, rows: int = 5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(out_features, in_features, generator=g),
            torch.randn(rows, in_features, generator=g))


def q4_1_raw(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1 rows of `weight`, made by the gguf package (not our code)."""
    raw = quantize(weight.numpy().astype(np.float32), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(raw))


def test_q4_1_rows_dequantize_as_the_gguf_package_does() -> None:
    weight, _ = weights_and_rows()
    raw = q4_1_raw(weight)
    want = dequantize(raw.numpy(), GGMLQuantizationType.Q4_1)
    assert torch.equal(dequantize_q4_1(raw), torch.from_numpy(want))


def q8_0_weights(weight: torch.Tensor) -> torch.Tensor:
    """The float weights of llama.cpp's Q8_0 blocks of `weight` (the gguf package's)."""
    raw = quantize(weight.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0).copy())


def exact_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).float()


def test_int4_from_q4_1_blocks_computes_with_the_blocks_own_weights() -> None:
    weight, x = weights_and_rows()
    raw = q4_1_raw(weight)
    layer = quantize_linear(weight, "int4", [raw[:40], raw[40:]])  # a fused layer's parts
    assert layer.from_q4_1_blocks
    got = layer(x)
    assert got.dtype == torch.float32
    if layer.own_kernel:  # float32 rows and weights: only the order of the sums differs
        assert relative_error(got, exact_product(x, dequantize_q4_1(raw))) < 1e-6
    else:  # PyTorch's kernel rounds rows, scales and offsets to bfloat16
        assert relative_error(got, exact_product(x, dequantize_q4_1(raw))) < 0.01


@pytest.mark.skipif(not bf16_dot_products(), reason="no bfloat16 dot products on this CPU")
def test_int4_on_bfloat16_rows_computes_with_the_blocks_own_weights() -> None:
    """bfloat16 rows (a bfloat16 model) through the bfloat16 dot-product kernel: the
    exact product of those rows with the file's weights, rounded once to bfloat16, and a
    row's result the same alone and in any batch."""
    weight, x = weights_and_rows(out_features=160, in_features=192, rows=37)
    raw = q4_1_raw(weight)
    layer = quantize_linear(weight, "int4", [raw])
    assert layer.take_bfloat16_rows() and layer.input_dtype == torch.bfloat16
    rows = x.bfloat16()
    got = layer(rows)
    assert got.dtype == torch.bfloat16
    want = exact_product(rows.float(), dequantize_q4_1(raw))
    # within a bfloat16 rounding of the output (2^-8 relative) and a float32 sum's error
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-4).all()
    for lo, hi in [(0, 1), (3, 4), (36, 37), (0, 6), (2, 13), (0, 16), (5, 21), (20, 37)]:
        assert torch.equal(layer(rows[lo:hi]), got[lo:hi]), (lo, hi)


def test_int8_from_q8_0_weights_recovers_the_blocks() -> None:
    weight, x = weights_and_rows()
    blocks = q8_0_weights(weight)
    layer = Int8Linear.from_float(blocks)
    assert relative_error(layer(x), exact_product(x, blocks)) < 1e-6


def test_int4_and_int8_from_float_weights_stay_within_their_quantization_error() -> None:
    weight, x = weights_and_rows()
    want = F.linear(x, weight)
    int4, int8 = Int4Linear.from_float(weight), Int8Linear.from_float(weight)
    assert not int4.from_q4_1_blocks
    # 16 levels per group of 32 (~8% relative), 255 levels per group of 32 (~0.5%).
    assert 0.02 < relative_error(int4(x), want) < 0.12
    assert relative_error(int8(x), want) < 0.01


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_a_rows_result_does_not_depend_on_the_batch(cls) -> None:
    # The kernel takes rows 16 at a time, then 8, 4, 2 and 1: every split of a batch.
    weight, x = weights_and_rows(out_features=160, in_features=192, rows=37)
    layer = cls.from_float(weight)
    batch = layer(x)
    for lo, hi in [(0, 1), (3, 4), (36, 37), (0, 15), (2, 13), (0, 16), (5, 21), (20, 37)]:
        assert torch.equal(layer(x[lo:hi]), batch[lo:hi]), (lo, hi)
    assert torch.equal(layer(x.view(1, 37, -1))[0], batch)


def tiny_model() -> tuple[MistralModel, torch.nn.Module, ModelConfig]:
    base = tiny_base()
    config = ModelConfig.from_hf(base.config.to_dict())
    ours = MistralModel(config)
    ours.load_hf_state_dict({k: v.clone() for k, v in base.state_dict().items()})
    return ours.eval(), base, config


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_stays_near_float_and_lora_applies_on_top(
        mode: str, tmp_path: Path) -> None:
    ours, base, config = tiny_model()
    save_adapter(base, tmp_path / "all", 1, TARGETS)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        float_logits = base(ids).logits[0]
    adapter_logits = peft_logits(base, tmp_path / "all", ids)[0]

    swapped, adopted = quantize_linear_layers(ours, mode)
    assert (swapped, adopted) == (2 * 4 + 1, 0)  # 4 linear layers a decoder layer, the head
    context = attach_lora(ours)
    context.adapters[1] = load_peft_adapter(tmp_path / "all", config, torch.float32)
    context.set_batch([0] * 12 + [1] * 12, ids.device)
    with torch.inference_mode():
        plain, adapted = ours.compute_logits(ours.forward_padded(ids.expand(2, -1)))
    bound = 0.3 if mode == "int4" else 0.04  # two layers of N(0, 0.3) weights amplify
    assert relative_error(plain, float_logits) < bound
    assert relative_error(adapted, adapter_logits) < bound
    # The adapter moved the logits much further than quantization did.
    assert relative_error(adapter_logits, float_logits) > 0.5 > bound


def test_auto_follows_a_gguf_files_precision_class() -> None:
    assert file_precision_class(["F32", "Q4_1", "Q8_0"]) == "int4"
    assert file_precision_class(["F32", "Q8_0"]) == "int8"
    assert file_precision_class(["F32", "F16"]) == "none"
    assert file_precision_class(None) == "none"
    assert resolve_quantization("int8", ["F32"]) == "int8"
    assert resolve_quantization("auto", None) == "none"
    assert resolve_quantization("auto", ["F32", "Q4_1"]) == "int4"
    assert resolve_quantization("auto", ["F32", "Q8_0"]) == "int8"
    assert resolve_quantization("none", ["F32", "Q4_1"]) == "none"
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        resolve_quantization("int3")
