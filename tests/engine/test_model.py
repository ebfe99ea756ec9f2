"""Our Mistral module against transformers' MistralForCausalLM (float32, atol 1e-4)."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.skipif(not BF16_PACKS, reason="this CPU has no native bfloat16 for oneDNN")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@torch.inference_mode()
def test_packed_linear_layers_give_the_plain_layers_logits(tied):
    """bfloat16 on CPU serves with oneDNN-packed weights: the same logits as the plain
    layers, in a batch of several rows and for a single row (the decode of one stream)."""
    ckpt = make_checkpoint(seed=6, tie_word_embeddings=tied)
    plain = ours(ckpt).to(torch.bfloat16)
    packed = ours(ckpt).to(torch.bfloat16)
    packed.pack_linear_layers()
    assert isinstance(packed.layers[0].feed_forward.w_down, PackedLinear)
    assert isinstance(packed.lm_head, PackedLinear)
    for shape in [(3, 17), (1, 1)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(7))
        expected = plain.compute_logits(plain.forward_padded(ids)).float()
        got = packed.compute_logits(packed.forward_padded(ids)).float()
        assert expected.abs().max() > 1.0
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.01)


def test_the_engine_packs_bfloat16_weights_on_cpu_only_where_it_can(tiny):
    from sirocco.engine import EngineConfig, LLMEngine

    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(tiny.model_config, tiny.state_dict,
                           EngineConfig(dtype=dtype, kv_cache_memory=2**20))
        head = engine.runner.model.lm_head
        assert isinstance(head, PackedLinear) == (dtype == "bfloat16" and BF16_PACKS)


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
