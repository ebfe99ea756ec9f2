"""LoRA adapters on our decoder give PEFT's own logits, several adapters in one batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM

from sirocco.models.config import ModelConfig
from sirocco.models.lora import LoRAError, attach_lora, load_peft_adapter
from sirocco.models.mistral import MistralModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, max_position_embeddings=64, sliding_window=None)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def save_adapter(base: MistralForCausalLM, path: Path, seed: int, targets: list[str]) -> None:
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    peft_model.unload()


def peft_logits(base: MistralForCausalLM, path: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, path).eval()
    with torch.inference_mode():
        out = model(ids).logits
    model.unload()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    base = tiny_base()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = ModelConfig.from_hf(base.config.to_dict())
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(base, root / "all", 1, TARGETS)
    save_adapter(base, root / "attn", 2, ["q_proj", "v_proj"])
    ours = MistralModel(config)
    ours.load_hf_state_dict(state)
    ours.eval()
    return base, ours, config, root


def our_logits(model: MistralModel, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
    context = model.lora_context
    b, n = ids.shape
    context.set_batch([s for s in slots for _ in range(n)], ids.device)
    with torch.inference_mode():
        logits = model.compute_logits(model.forward_padded(ids))
    context.clear()
    return logits


def test_adapters_match_peft_alone_and_mixed_in_one_batch(setup) -> None:
    base, ours, config, root = setup
    ours.lora_context = attach_lora(ours)
    ours.lora_context.adapters[1] = load_peft_adapter(root / "all", config, torch.float32)
    ours.lora_context.adapters[2] = load_peft_adapter(root / "attn", config, torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        base_ref = base(ids).logits
    ref_all = peft_logits(base, root / "all", ids)
    ref_attn = peft_logits(base, root / "attn", ids)
    assert (ref_all - base_ref).abs().max() > 0.1  # the adapters do change the model

    batch = ids.expand(3, -1)
    mixed = our_logits(ours, batch, [1, 0, 2])
    torch.testing.assert_close(mixed[0], ref_all[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], base_ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[2], ref_attn[0], atol=1e-4, rtol=0)


def test_an_adapter_of_another_shape_is_refused(setup, tmp_path: Path) -> None:
    _, _, config, root = setup
    other = replace(config, hidden_size=64)
    with pytest.raises(LoRAError, match="do not fit"):
        load_peft_adapter(root / "all", other, torch.float32)


def test_a_directory_without_an_adapter_is_refused(setup, tmp_path: Path) -> None:
    _, _, config, _ = setup
    with pytest.raises(LoRAError, match="not a readable PEFT adapter"):
        load_peft_adapter(tmp_path, config, torch.float32)
