"""Finding and reading checkpoints: local directories, GGUF files and Hub ids.

A checkpoint on disk is one of:
- Hugging Face layout: `config.json` + `*.safetensors` (sharded with an index or not);
- Mistral's native layout: `params.json` + `consolidated.safetensors`;
- a GGUF file (or a directory holding one), converted once into the Hugging Face
  layout under the data dir (`models/gguf.py`).

Weights always come out in Hugging Face naming, so the torch module has one convention.
Every failure is a `ModelLoadError` with a one-line message that names the path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sirocco.models.config import ModelConfig
from sirocco.models.gguf import Q4_1_BLOCKS_FILE
from sirocco.models.quantized import Q4_1_KEY_SUFFIX
from sirocco.tokenizers.base import Tokenizer
from sirocco.tokenizers.mistral import MistralCommonTokenizer, find_mistral_tokenizer

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message is meant for the user."""


@dataclass(slots=True)
class Checkpoint:
    """A checkpoint found on disk: where it is, its layout, architecture and tokenizer."""

    path: Path
    layout: str  # "hf" or "mistral"
    config: ModelConfig
    weight_files: list[Path]
    mistral_tokenizer: Path | None  # a mistral-common file, when one ships with the weights

    @property
    def name(self) -> str:
        return self.path.name


def resolve_model_path(spec: str, data_dir: Path) -> Path:
    """A local checkpoint directory for `spec`: a path, a GGUF file or a Hub repo id."""
    path = Path(spec).expanduser()
    if path.exists():
        from sirocco.models import gguf

        try:
            gguf_file = gguf.find_gguf(path)
            if gguf_file is not None:
                return gguf.convert_gguf(gguf_file, data_dir / "cache" / "gguf")
        except gguf.GGUFError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        return path.resolve()
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _download_from_hub(spec, data_dir)
    raise ModelLoadError(f"model {spec!r} not found: no such file or directory")


def _download_from_hub(repo_id: str, data_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model*", "tekken*.json", "*.txt", "*.md"]
    try:  # a copy already in the Hub cache needs no network
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: no network connection "
            f"({type(exc).__name__}); pass a local directory to --model instead"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face Hub (HTTP {status}): "
            "check the repo id and your access token (HF_TOKEN)"
        ) from None
    except Exception as exc:  # network stacks raise many kinds of errors
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: {exc}"
        ) from None


def inspect_checkpoint(path: Path) -> Checkpoint:
    """Identify a checkpoint directory's layout; a clear error if it is not a model."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a model directory")
    if (path / "config.json").is_file():
        layout = "hf"
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
        archs = raw.get("architectures") or [raw.get("model_type", "?")]
        if not any(
            a in ("MistralForCausalLM", "LlamaForCausalLM", "mistral", "llama") for a in archs
        ):
            raise ModelLoadError(
                f"{path}: architecture {archs[0]} is not supported "
                "(Sirocco serves Mistral and Llama architectures)"
            )
        config = _config_or_error(ModelConfig.from_hf, raw, path / "config.json")
        weights = _hf_weight_files(path)
    elif (path / "params.json").is_file():
        layout = "mistral"
        raw = json.loads((path / "params.json").read_text())
        if raw.get("moe"):
            raise ModelLoadError(f"{path}: mixture-of-experts checkpoints are not supported yet")
        config = _config_or_error(ModelConfig.from_mistral_params, raw, path / "params.json")
        weights = sorted(path.glob("consolidated*.safetensors"))
        if not weights:
            raise ModelLoadError(f"{path} has params.json but no consolidated.safetensors")
    else:
        raise ModelLoadError(
            f"{path} is not a model directory: it has neither config.json (Hugging Face layout) "
            "nor params.json (Mistral layout)"
        )
    return Checkpoint(path, layout, config, weights, find_mistral_tokenizer(path))


def _config_or_error(build, raw: dict, where: Path) -> ModelConfig:
    try:
        return build(raw)
    except KeyError as exc:
        raise ModelLoadError(f"{where} lacks the field {exc.args[0]!r}") from None


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"{path} is missing shard {missing[0]} named in {index.name}")
        return [path / s for s in shards]
    # The raw Q4_1 rows a converted GGUF file keeps beside its weights are not weights.
    files = sorted(f for f in path.glob("*.safetensors") if f.name != Q4_1_BLOCKS_FILE)
    if not files:
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights")
    return files


def _mistral_to_hf_name(name: str) -> str:
    table = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in table:
        return table[name]
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if not m:
        return name
    layer, rest = m.groups()
    parts = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    return f"model.layers.{layer}.{parts.get(rest, rest)}"


def _permute_for_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Mistral's native q/k rows are in interleaved-pair RoPE order; HF uses half-split."""
    return w.view(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def load_weights(ckpt: Checkpoint, dtype: torch.dtype,
                 q4_1_blocks: bool = False) -> dict[str, torch.Tensor]:
    """All weights in Hugging Face naming, cast to `dtype`; logs progress per shard.

    `q4_1_blocks`: also the raw Q4_1 rows that a converted GGUF file kept
    (`models/gguf.py`), each under its weight's name + `Q4_1_KEY_SUFFIX`, uncast.
    """
    total = sum(f.stat().st_size for f in ckpt.weight_files)
    state: dict[str, torch.Tensor] = {}
    done = 0
    for i, file in enumerate(ckpt.weight_files, 1):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key).to(dtype)
        except Exception as exc:
            raise ModelLoadError(f"cannot read weights from {file}: {exc}") from None
        done += file.stat().st_size
        if total > 512 * 1024**2:
            log.info(
                "loaded %s (%d/%d, %.0f%%)",
                file.name,
                i,
                len(ckpt.weight_files),
                100 * done / total,
            )
    if ckpt.layout == "mistral":
        cfg = ckpt.config
        state = {_mistral_to_hf_name(k): v for k, v in state.items()}
        for key in list(state):
            if key.endswith("self_attn.q_proj.weight"):
                state[key] = _permute_for_rotate_half(
                    state[key], cfg.num_attention_heads, cfg.head_dim
                )
            elif key.endswith("self_attn.k_proj.weight"):
                state[key] = _permute_for_rotate_half(
                    state[key], cfg.num_key_value_heads, cfg.head_dim
                )
    blocks_file = ckpt.path / Q4_1_BLOCKS_FILE
    if q4_1_blocks and blocks_file.is_file():
        try:
            with safe_open(str(blocks_file), framework="pt") as handle:
                for key in handle.keys():
                    state[key + Q4_1_KEY_SUFFIX] = handle.get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"cannot read Q4_1 blocks from {blocks_file}: {exc}") from None
    if "lm_head.weight" not in state and not ckpt.config.tie_word_embeddings:
        ckpt.config.tie_word_embeddings = True  # checkpoints that omit the head share embeddings
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in state]
    if missing:
        raise ModelLoadError(f"{ckpt.path}: weights lack {missing[0]}")
    return state


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    """mistral-common for a Mistral tokenizer file, else the Hugging Face tokenizer."""
    if ckpt.mistral_tokenizer is not None:
        try:
            return MistralCommonTokenizer(ckpt.mistral_tokenizer)
        except Exception as exc:
            raise ModelLoadError(f"cannot read tokenizer {ckpt.mistral_tokenizer}: {exc}") from None
    if (ckpt.path / "tokenizer.json").is_file() or (ckpt.path / "tokenizer_config.json").is_file():
        from sirocco.tokenizers.hf import HFTokenizer

        try:
            return HFTokenizer(ckpt.path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read the tokenizer in {ckpt.path}: {exc}") from None
    raise ModelLoadError(
        f"{ckpt.path} has no tokenizer: expected tekken.json, tokenizer.model.v* "
        "or tokenizer.json beside the weights"
    )


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return name
