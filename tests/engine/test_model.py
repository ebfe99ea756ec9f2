"""Our Mistral module against transformers' MistralForCausalLM (float32, atol 1e-4)."""

from __future__ import annotations

import pytest
import torch

from sirocco.models.kernels import bf16_dot_products
from sirocco.models.mistral import MistralModel, PackedLinear, can_pack
from tests.engine.conftest import make_checkpoint

ATOL = 1e-4


def ours(ckpt) -> MistralModel:
    model = MistralModel(ckpt.model_config).eval()
    model.load_hf_state_dict(ckpt.state_dict)
    return model


def hf_logits(ckpt, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return ckpt.hf_model(ids).logits


@torch.inference_mode()
def test_one_prompt_logits_match_transformers(tiny):
    model = ours(tiny)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    logits = model.compute_logits(model.forward_padded(ids))
    ref = hf_logits(tiny, ids)
    assert ref.abs().max() > 1.0  # not flat
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batch_of_different_lengths_matches_transformers(tiny):
    model = ours(tiny)
    g = torch.Generator().manual_seed(2)
    lengths = [5, 17, 11]
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    hidden = model.forward_padded(padded, torch.tensor(lengths))
    logits = model.compute_logits(hidden)
    for i, p in enumerate(prompts):
        ref = hf_logits(tiny, p.unsqueeze(0))[0]
        torch.testing.assert_close(logits[i, : len(p)], ref, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_sliding_window_shorter_than_sequence_matches(tiny_windowed):
    model = ours(tiny_windowed)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(tiny_windowed, ids)
    torch.testing.assert_close(model.compute_logits(model.forward_padded(ids)), ref,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 500000.0}},
], ids=["tied", "rope-linear", "rope-llama3"])
@torch.inference_mode()
def test_variants_match_transformers(overrides):
    ckpt = make_checkpoint(seed=4, **overrides)
    model = ours(ckpt)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.compute_logits(model.forward_padded(ids)),
                               hf_logits(ckpt, ids), atol=ATOL, rtol=0)


def test_unknown_rope_scaling_is_a_clear_error(tiny):
    from dataclasses import replace

    cfg = replace(tiny.model_config, rope_scaling={"rope_type": "wobbly", "factor": 2.0})
    with pytest.raises(ValueError, match="wobbly"):
        MistralModel(cfg)


BF16_PACKS = can_pack(torch.bfloat16, torch.device("cpu"))
PACKS = {"float32": can_pack(torch.float32, torch.device("cpu")), "bfloat16": BF16_PACKS}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@torch.inference_mode()
def test_packed_linear_layers_give_the_plain_layers_logits(tied, dtype):
    """On CPU the engine serves with oneDNN-packed weights: the same logits as the plain
    layers, in a batch of several rows and for a single row (the decode of one stream)."""
    if not PACKS[dtype]:
        pytest.skip(f"this CPU's oneDNN does not run {dtype}")
    dt = getattr(torch, dtype)
    ckpt = make_checkpoint(seed=6, tie_word_embeddings=tied)
    plain = ours(ckpt).to(dt)
    packed = ours(ckpt).to(dt)
    packed.pack_linear_layers()
    assert isinstance(packed.layers[0].feed_forward.w_down, PackedLinear)
    assert isinstance(packed.lm_head, PackedLinear)
    tolerance = {"atol": 0.05, "rtol": 0.01} if dt == torch.bfloat16 else {}
    for shape in [(3, 17), (1, 1)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(7))
        expected = plain.compute_logits(plain.forward_padded(ids)).float()
        got = packed.compute_logits(packed.forward_padded(ids)).float()
        assert expected.abs().max() > 1.0
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (576, 49152)])
@torch.inference_mode()
def test_a_packed_row_is_the_same_alone_and_in_any_batch(in_features, out_features, dtype):
    """A token's projection does not depend on how many other rows share the batch
    (SmolLM2's layer shapes): bitwise, alone (decode of one stream), in small batches and in
    a long prefill chunk, at any offset. float32 runs oneDNN; bfloat16 Sirocco's kernel."""
    if not PACKS[dtype] or (dtype == "bfloat16" and not bf16_dot_products()):
        pytest.skip(f"no packed {dtype} layers on this CPU")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    x = torch.randn(600, in_features, generator=g)
    weight, x = weight.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    layer = PackedLinear(weight)
    assert layer.own_kernel == (dtype == "bfloat16")
    reference = layer(x)
    for rows, offset in [(1, 0), (1, 37), (2, 5), (3, 100), (7, 1), (16, 300), (129, 20),
                         (511, 88)]:
        got = layer(x[offset:offset + rows].clone())
        assert torch.equal(got, reference[offset:offset + rows]), (rows, offset)
    # against float64 over the same bfloat16 values: one rounding of a float32 sum
    expected = (x.double() @ weight.double().T)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-2, atol=1e-2)


def test_the_engine_packs_weights_on_cpu_where_it_can(tiny):
    from sirocco.engine import EngineConfig, LLMEngine

    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(tiny.model_config, tiny.state_dict,
                           EngineConfig(dtype=dtype, kv_cache_memory=2**20))
        head = engine.runner.model.lm_head
        assert isinstance(head, PackedLinear) == PACKS[dtype]


def test_auto_dtype_keeps_small_models_in_float32_on_cpu() -> None:
    from sirocco.engine.config import SMALL_MODEL_PARAMETERS, resolve_dtype
    from sirocco.models.config import ModelConfig

    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, tie_word_embeddings=True)
    assert 134e6 < smollm2.num_parameters < 135e6  # SmolLM2-135M's published size
    assert resolve_dtype("auto", "cpu", smollm2.num_parameters) == torch.float32
    assert resolve_dtype("bfloat16", "cpu", smollm2.num_parameters) == torch.bfloat16
    big = resolve_dtype("auto", "cpu", 7 * SMALL_MODEL_PARAMETERS)
    assert big == resolve_dtype("auto", "cpu")  # large models keep the hardware's choice
