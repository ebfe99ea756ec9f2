"""A fast stand-in for `sirocco.finetune.trainer.train`, for the job worker's tests.

Selected with `SIROCCO_FINETUNE_TRAINER=fake_trainer:train` (this directory on
PYTHONPATH). `hyperparameters.training_steps` steps of `FAKE_TRAINER_STEP_S` seconds each
(default 0.02), a checkpoint per step, and a tiny adapter directory at the end. A
`learning_rate` of exactly 0.5 makes it fail, to test FAILED jobs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


class TrainingCancelled(Exception):
    """Asked to stop."""


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    metrics: dict
    trained_tokens: int = 0


def train(spec, reporter) -> TrainResult:
    steps = int(spec.hyperparameters.get("training_steps") or 3)
    if spec.hyperparameters.get("learning_rate") == 0.5:
        raise RuntimeError("the fake trainer was asked to fail")
    delay = float(os.environ.get("FAKE_TRAINER_STEP_S", "0.02"))
    for path, _weight in spec.training_files:
        assert Path(path).is_file(), path
    reporter.event("training started", {"training_steps": steps, "train_tokens_per_step": 100,
                                        "data_tokens": 1000, "seed": spec.seed})
    metrics = {}
    for step in range(1, steps + 1):
        if reporter.should_stop():
            raise TrainingCancelled()
        time.sleep(delay)
        metrics = {"train_loss": 2.0 / step, "valid_loss": 2.5 / step if spec.validation_files
                   else None, "valid_mean_token_accuracy": 0.5}
        reporter.checkpoint(step, metrics)
    adapter = Path(spec.output_dir)
    write_zero_adapter(Path(spec.base_model_dir), adapter)
    return TrainResult(adapter, steps, metrics, trained_tokens=steps * 100)


def write_zero_adapter(base_model_dir: Path, adapter: Path) -> None:
    """A valid PEFT LoRA adapter (rank 1 on layer 0's q_proj) whose delta is zero."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base_model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    adapter.mkdir(parents=True, exist_ok=True)
    save_file({f"{prefix}.lora_A.weight": torch.zeros(1, hidden),
               f"{prefix}.lora_B.weight": torch.zeros(config["num_attention_heads"] * head_dim, 1)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}))
