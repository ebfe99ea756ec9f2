"""LoRA fine-tuning of a base checkpoint: one `train(spec, reporter)` call per job.

The job worker runs this in its own process. The base model is built as transformers'
`MistralForCausalLM` (or `LlamaForCausalLM`) in float32 from any checkpoint layout Sirocco
reads, wrapped with PEFT LoRA on every linear layer, and trained with AdamW on packed
rows of `seq_len` tokens: linear warmup to the peak learning rate, then cosine decay
(the schedule Mistral's documentation describes). The adapter is saved in the PEFT format
(`adapter_config.json` + `adapter_model.safetensors`), written whole or not at all.

Progress goes to a `Reporter`: events, checkpoints with train_loss / valid_loss /
valid_mean_token_accuracy, and a `should_stop()` polled at every step, so a cancelled job
stops within one step. At each checkpoint the run also saves what it needs to resume
(`resume_state_path`): a run started again on the same spec after a crash goes on from
its last checkpoint and ends with the adapter an uninterrupted run would have given.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sirocco.finetune.data import (
    PackedRow,
    Sample,
    TrainingDataError,
    load_samples,
    mixed_rows,
    pack_all,
)
from sirocco.models.loader import Checkpoint, inspect_checkpoint, load_tokenizer, load_weights

#: Mistral's contract defaults (reference/mistral-api.md section 8.1); the rest are ours.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "training_steps": None,
    "epochs": None,
    "learning_rate": 1e-4,
    "weight_decay": 0.1,
    "warmup_fraction": 0.05,
    "seq_len": 2048,
    "fim_ratio": 0.9,
    "batch_size": 1,  # packed rows per step
}
LORA_RANK = 16
LORA_ALPHA = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTS_PER_RUN = 10
PROGRESS_EVERY_S = 5.0


class TrainingCancelled(Exception):
    """The reporter asked training to stop; nothing was saved."""


@dataclass
class TrainSpec:
    """Everything one training run needs; paths are local files the worker prepared."""

    base_model_dir: Path
    training_files: list[tuple[Path, float]]  # (path, sampling weight)
    validation_files: list[Path]
    hyperparameters: dict
    output_dir: Path
    seed: int = 0


class Reporter(Protocol):
    """Where training reports to (the job worker records events and checkpoints)."""

    def event(self, name: str, data: dict) -> None: ...

    def checkpoint(self, step: int, metrics: dict) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class TrainResult:
    """A finished run: where the adapter is, how many steps ran, the final metrics."""

    adapter_dir: Path
    steps: int
    metrics: dict
    trained_tokens: int = 0  # loss-bearing tokens seen, summed over steps


@dataclass(slots=True)
class Schedule:
    """Hyperparameters resolved against the data: how many steps, of what size."""

    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    checkpoint_every: int

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for 0-based `step`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_hyperparameters(hyperparameters: dict, data_tokens: int, max_len: int) -> Schedule:
    """Defaults filled in; `epochs` turned into steps (one epoch = every data token once)."""
    hp = {**DEFAULT_HYPERPARAMETERS, **{k: v for k, v in hyperparameters.items() if v is not None}}
    seq_len = int(min(hp["seq_len"], max_len))
    batch_size = max(1, int(hp["batch_size"]))
    tokens_per_step = seq_len * batch_size
    if hp["training_steps"] is not None:
        steps = int(hp["training_steps"])
    else:
        epochs = float(hp["epochs"] if hp["epochs"] is not None else 1.0)
        steps = math.ceil(epochs * data_tokens / tokens_per_step)
    steps = max(1, steps)
    return Schedule(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        learning_rate=float(hp["learning_rate"]),
        weight_decay=float(hp["weight_decay"]),
        warmup_steps=max(1, round(float(hp["warmup_fraction"]) * steps)),
        checkpoint_every=max(1, math.ceil(steps / CHECKPOINTS_PER_RUN)),
    )


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def training_threads(hidden_size: int) -> int:
    """Torch threads for training: one core left for serving, and one only for tiny models.

    Measured on a shared, busy 2-core CPU: a SmolLM2 step took ~5.5 s on one thread and
    ~50 s on two, the demo model (hidden 64) ~60 ms on one and 250-1500 ms on two; the
    threads of an oversubscribed CPU wait on each other. Leaving a core free also keeps
    chat responsive while a job trains. `SIROCCO_TRAIN_THREADS` overrides.
    """
    if os.environ.get("SIROCCO_TRAIN_THREADS"):
        return max(1, int(os.environ["SIROCCO_TRAIN_THREADS"]))
    return max(1, min(available_cores() - 1, hidden_size // 256))


# ----------------------------------------------------------------------------------------
# Model


def build_base_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The checkpoint as a float32 transformers causal LM (Mistral or Llama class)."""
    from transformers import (
        AutoConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    llama = ckpt.config.architecture == "llama"
    if ckpt.layout == "hf":
        config = AutoConfig.from_pretrained(ckpt.path)
    else:
        fields = ckpt.config.to_hf()
        config = (LlamaConfig if llama else MistralConfig)(**fields)
    state = load_weights(ckpt, torch.float32)  # may set tie_word_embeddings
    config.tie_word_embeddings = ckpt.config.tie_word_embeddings
    config.use_cache = False
    model = (LlamaForCausalLM if llama else MistralForCausalLM)(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{ckpt.path}: weights do not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.float()


def add_lora(model: torch.nn.Module, base_model_dir: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_model_dir),
    )
    return get_peft_model(model, config)


def row_tensors(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([r.input_ids for r in rows]),
        "labels": torch.tensor([r.labels for r in rows]),
        "position_ids": torch.tensor([r.position_ids for r in rows]),
    }


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(per-target-token losses, predictions, targets) for the loss-bearing positions."""
    targets = batch["labels"][:, 1:]
    # Logits only where some row has a target: the output head is most of the compute.
    positions = (targets != -100).any(0).nonzero().squeeze(1)
    # No attention mask and restarting position ids: transformers masks packed samples
    # block-diagonally, so a sample never sees the one packed before it.
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False, logits_to_keep=positions).logits
    targets = targets[:, positions]
    keep = targets != -100
    logits = logits[keep].float()
    targets = targets[keep]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return losses, logits.argmax(-1), targets


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: list[PackedRow], batch_size: int,
             reporter: Reporter) -> tuple[float | None, float | None]:
    """(valid_loss, valid_mean_token_accuracy) over every loss-bearing validation token."""
    total_loss, correct, count = 0.0, 0, 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        if reporter.should_stop():
            raise TrainingCancelled()
        batch = row_tensors(rows[start : start + batch_size])
        losses, predicted, targets = token_losses(model, batch)
        total_loss += losses.sum().item()
        correct += (predicted == targets).sum().item()
        count += targets.numel()
    model.train()
    if count == 0:
        return None, None
    return total_loss / count, correct / count


# ----------------------------------------------------------------------------------------
# Training


@dataclass
class PreparedData:
    """Tokenized training and validation data, with the schedule it implies."""

    checkpoint: Checkpoint
    pad_id: int
    sources: list[tuple[list[Sample], float]]
    valid_samples: list[Sample]
    data_tokens: int
    schedule: Schedule


def prepare_data(spec: TrainSpec, check_stop=lambda: None) -> PreparedData:
    """Tokenize every file with the base model's tokenizer and resolve the schedule."""
    ckpt = inspect_checkpoint(Path(spec.base_model_dir))
    tokenizer = load_tokenizer(ckpt)
    fim_ratio = spec.hyperparameters.get("fim_ratio")
    fim_ratio = float(DEFAULT_HYPERPARAMETERS["fim_ratio"] if fim_ratio is None else fim_ratio)
    sources: list[tuple[list[Sample], float]] = []
    for index, (path, weight) in enumerate(spec.training_files):
        check_stop()
        samples = load_samples(Path(path), tokenizer, fim_ratio, seed=spec.seed + index)
        sources.append((samples, float(weight)))
    valid_samples = [
        s for path in spec.validation_files for s in load_samples(Path(path), tokenizer)
    ]
    if not any(s.trained_tokens for samples, _ in sources for s in samples):
        raise TrainingDataError("the training files have no tokens to train on "
                                "(every assistant message has weight 0?)")
    data_tokens = sum(len(s.tokens) for samples, _ in sources for s in samples)
    schedule = resolve_hyperparameters(spec.hyperparameters, data_tokens,
                                       ckpt.config.max_position_embeddings)
    return PreparedData(ckpt, tokenizer.eos_token_ids[0], sources, valid_samples,
                        data_tokens, schedule)


def estimate(spec: TrainSpec) -> dict:
    """What a run would do, without training (for a dry run and the job's metadata)."""
    data = prepare_data(spec)
    per_step = data.schedule.batch_size * data.schedule.seq_len
    return {
        "training_steps": data.schedule.steps,
        "train_tokens_per_step": per_step,
        "train_tokens": per_step * data.schedule.steps,
        "data_tokens": data.data_tokens,
        "epochs": per_step * data.schedule.steps / max(1, data.data_tokens),
    }


def resume_state_path(spec: TrainSpec) -> Path:
    """Where a run keeps what it needs to resume after its last checkpoint: beside the
    adapter's directory (the job's directory, for the job worker)."""
    return Path(spec.output_dir).with_name("resume") / "state.pt"


def _plan(schedule: Schedule) -> list:
    return [schedule.steps, schedule.batch_size, schedule.seq_len, schedule.learning_rate]


def _save_resume_state(path: Path, schedule: Schedule, step: int, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, lr_schedule: Any, trained_tokens: int,
                       metrics: dict) -> None:
    """The LoRA weights, optimizer, learning-rate schedule and random state after `step`,
    written atomically (a crash mid-write leaves the previous state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "plan": _plan(schedule), "step": step, "trained_tokens": trained_tokens,
        "metrics": dict(metrics), "rng": torch.get_rng_state(),
        "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_resume_state(path: Path, schedule: Schedule) -> dict | None:
    """The saved state of an interrupted run of this same plan, or None."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    return state if state.get("plan") == _plan(schedule) else None


def train(spec: TrainSpec, reporter: Reporter) -> TrainResult:
    """Train a LoRA adapter on `spec`'s data; raises TrainingCancelled if asked to stop."""
    started = time.monotonic()
    torch.manual_seed(spec.seed)

    def check_stop() -> None:
        if reporter.should_stop():
            raise TrainingCancelled()

    data = prepare_data(spec, check_stop)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(data.checkpoint.config.hidden_size))
    try:
        return _train_prepared(spec, data, reporter, check_stop, started)
    finally:
        torch.set_num_threads(threads_before)  # the caller's process keeps its setting


def _train_prepared(spec: TrainSpec, data: PreparedData, reporter: Reporter, check_stop,
                    started: float) -> TrainResult:
    ckpt, schedule, data_tokens = data.checkpoint, data.schedule, data.data_tokens
    stream = mixed_rows(data.sources, schedule.seq_len, data.pad_id, spec.seed)
    valid_rows = pack_all(data.valid_samples, schedule.seq_len, data.pad_id)

    check_stop()
    model = add_lora(build_base_model(ckpt), Path(spec.base_model_dir))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate,
                                  weight_decay=schedule.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    reporter.event("training started", {
        "training_steps": schedule.steps,
        "batch_size": schedule.batch_size,
        "seq_len": schedule.seq_len,
        "train_tokens_per_step": schedule.batch_size * schedule.seq_len,
        "data_tokens": data_tokens,
        "trainable_parameters": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    })

    window_losses: list[float] = []
    metrics: dict[str, float | None] = {
        "train_loss": None, "valid_loss": None, "valid_mean_token_accuracy": None}
    trained_tokens = 0
    state_path = resume_state_path(spec)
    done_steps = 0
    saved = _load_resume_state(state_path, schedule)
    if saved is not None:  # a run interrupted after a checkpoint: go on from there
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        lr_schedule.load_state_dict(saved["lr_schedule"])
        torch.set_rng_state(saved["rng"])
        done_steps, trained_tokens, metrics = (saved["step"], saved["trained_tokens"],
                                               saved["metrics"])
        for _ in range(done_steps * schedule.batch_size):  # the rows already trained on
            next(stream)
        reporter.event("training resumed", {"step": done_steps,
                                            "training_steps": schedule.steps})
    last_progress = time.monotonic()
    loop_started = time.monotonic()
    for step in range(done_steps + 1, schedule.steps + 1):
        check_stop()
        batch = row_tensors([next(stream) for _ in range(schedule.batch_size)])
        losses, _, _ = token_losses(model, batch)
        if losses.numel() == 0:  # a row of weight-0 turns only: nothing to learn from
            loss = torch.zeros((), requires_grad=True)
        else:
            loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += losses.numel()
        window_losses.append(loss.item())

        now = time.monotonic()
        if step % schedule.checkpoint_every == 0 or step == schedule.steps:
            valid_loss, accuracy = evaluate(model, valid_rows, schedule.batch_size, reporter)
            metrics = {
                "train_loss": sum(window_losses) / len(window_losses),
                "valid_loss": valid_loss,
                "valid_mean_token_accuracy": accuracy,
            }
            window_losses = []
            if step < schedule.steps:
                _save_resume_state(state_path, schedule, step, model, optimizer, lr_schedule,
                                   trained_tokens, metrics)
            reporter.checkpoint(step, dict(metrics))
        if now - last_progress >= PROGRESS_EVERY_S or step == schedule.steps:
            elapsed = now - loop_started
            reporter.event("training progress", {
                "step": step,
                "training_steps": schedule.steps,
                "train_loss": loss.item(),
                "learning_rate": lr_schedule.get_last_lr()[0],
                "elapsed_seconds": round(elapsed, 1),
                "remaining_seconds": round(elapsed / (step - done_steps)
                                       * (schedule.steps - step), 1),
            })
            last_progress = now

    check_stop()
    adapter_dir = save_adapter(model, Path(spec.output_dir))
    shutil.rmtree(state_path.parent, ignore_errors=True)
    reporter.event("training finished", {
        "training_steps": schedule.steps,
        "trained_tokens": trained_tokens,
        "seconds": round(time.monotonic() - started, 1),
        **metrics,
    })
    return TrainResult(adapter_dir, schedule.steps, metrics, trained_tokens)


def save_adapter(model: torch.nn.Module, output_dir: Path) -> Path:
    """Save the PEFT adapter to `output_dir` atomically: a temp dir, fsync, then rename."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
        tmp.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output_dir)
    dir_fd = os.open(output_dir.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return output_dir
