"""The command line, settings from the environment, and checkpoint loading."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sirocco.cli import build_parser
from sirocco.config import settings_from_args
from sirocco.engine.config import available_cores, default_threads, set_compute_threads
from sirocco.models.config import ModelConfig
from sirocco.models.demo import DEMO_CONFIG
from sirocco.models.loader import (
    ModelLoadError,
    inspect_checkpoint,
    load_tokenizer,
    load_weights,
    resolve_model_path,
)
from sirocco.tokenizers.mistral import MistralCommonTokenizer


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sirocco", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_demo_model_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("demo-model", str(a)).returncode == 0
    assert run_cli("demo-model", str(b)).returncode == 0
    for name in ("config.json", "model.safetensors", "tokenizer.model.v3"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]


def test_demo_model_loads_in_transformers(demo_model_dir: Path) -> None:
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(demo_model_dir)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, DEMO_CONFIG.vocab_size)
    assert logits.std() > 1.0  # std-0.3 weights: logits are far from flat


def test_flags_come_from_environment_and_flags_win() -> None:
    parser = build_parser()
    env = {
        "SIROCCO_PORT": "9001",
        "SIROCCO_DTYPE": "float32",
        "SIROCCO_API_KEY": "a,b",
        "SIROCCO_MAX_UPLOAD_SIZE": "2MiB",
        "SIROCCO_MODEL": "/m1",
    }
    settings = settings_from_args(parser.parse_args(["serve", "--port", "9002"]), env)
    assert settings.port == 9002
    assert settings.dtype == "float32"
    assert settings.api_keys == ["a", "b"]
    assert settings.max_upload_size == 2 * 1024 * 1024
    assert settings.models == ["/m1"]


def test_invalid_environment_value_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="SIROCCO_DTYPE"):
        settings_from_args(build_parser().parse_args(["serve"]), {"SIROCCO_DTYPE": "float8"})


def test_serve_help_lists_every_flag() -> None:
    out = run_cli("serve", "--help").stdout
    for flag in (
        "--model",
        "--served-model-name",
        "--dtype",
        "--host",
        "--port",
        "--api-key",
        "--data-dir",
        "--log-level",
        "--kv-cache-memory",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--threads",
        "SIROCCO_API_KEY",
    ):
        assert flag in out


def test_compute_threads_leave_a_core_to_the_server_and_the_flag_overrides(
        caplog: pytest.LogCaptureFixture) -> None:
    assert [default_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert [default_threads(n, engine_process=True) for n in (1, 2, 16)] == [1, 2, 16]
    cores = available_cores()
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="sirocco.engine.config"):
            assert set_compute_threads(None) == default_threads(cores) == torch.get_num_threads()
            assert f"compute threads: {default_threads(cores)} of {cores} cores (one core " \
                "left to the server" in caplog.text
            assert set_compute_threads(None, engine_process=True) == cores
            assert f"compute threads: {cores} of {cores} cores (all of them: the engine's " \
                "own process" in caplog.text
            assert set_compute_threads(2) == 2 == torch.get_num_threads()
            assert f"compute threads: 2 of {cores} cores (--threads)" in caplog.text
    finally:
        torch.set_num_threads(before)
    env = settings_from_args(build_parser().parse_args(["serve"]), {"SIROCCO_THREADS": "3"})
    assert env.threads == 3


def test_a_server_takes_its_thread_count_and_refuses_zero(demo_model_dir: Path,
                                                          tmp_path: Path) -> None:
    from tests.conftest import start_server

    result = run_cli("serve", "--threads", "0", "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "--threads must be positive, got 0" in result.stderr
    server = start_server(["--model", str(demo_model_dir), "--threads", "2"], tmp_path / "two")
    try:
        assert "compute threads: 2 of" in server.log()
        assert re.search(r"\[engine [^]]+\] sirocco.engine.config: compute threads: 2 of",
                         server.log())  # the engine process's own choice
    finally:
        server.stop()


def test_not_a_model_directory_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("serve", "--model", str(tmp_path), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert f"{tmp_path} is not a model directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_id_without_network_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = run_cli(
        "serve",
        "--model",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "--data-dir",
        str(tmp_path / "d"),
        env=env,
    )
    assert result.returncode == 2
    assert "mistralai/Mistral-7B-Instruct-v0.3" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)


def test_sharded_hf_checkpoint_loads_like_a_single_file(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    state = load_file(demo_model_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "tokenizer.model.v3"):
        (tmp_path / name).write_bytes((demo_model_dir / name).read_bytes())
    loaded = load_weights(inspect_checkpoint(tmp_path), torch.float32)
    assert sorted(loaded) == names
    assert all(torch.equal(loaded[k], state[k]) for k in names)


def test_missing_shard_names_the_file(demo_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((demo_model_dir / "config.json").read_bytes())
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        inspect_checkpoint(tmp_path)


def _to_native_layout(hf_dir: Path, out: Path, config: ModelConfig) -> None:
    """Write a checkpoint the way mistral-inference stores it (interleaved RoPE rows)."""
    state = load_file(hf_dir / "model.safetensors")
    renames = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    native = {}
    for name, tensor in state.items():
        if name == "model.embed_tokens.weight":
            native["tok_embeddings.weight"] = tensor
        elif name == "model.norm.weight":
            native["norm.weight"] = tensor
        elif name == "lm_head.weight":
            native["output.weight"] = tensor
        else:
            new = name.removeprefix("model.")
            for old, repl in renames.items():
                new = new.replace(old, repl)
            if new.endswith(("attention.wq.weight", "attention.wk.weight")):
                heads = config.num_attention_heads if "wq" in new else config.num_key_value_heads
                d = config.head_dim
                tensor = tensor.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(tensor.shape)
            native[new] = tensor.contiguous()
    out.mkdir()
    save_file(native, out / "consolidated.safetensors")
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
    }
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model.v3").write_bytes((hf_dir / "tokenizer.model.v3").read_bytes())


def test_mistral_native_layout_loads_to_the_same_weights(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    native_dir = tmp_path / "native"
    _to_native_layout(demo_model_dir, native_dir, DEMO_CONFIG)
    ckpt = inspect_checkpoint(native_dir)
    assert ckpt.layout == "mistral"
    assert ckpt.config.hidden_size == DEMO_CONFIG.hidden_size
    assert ckpt.config.num_key_value_heads == DEMO_CONFIG.num_key_value_heads
    loaded = load_weights(ckpt, torch.float32)
    reference = load_file(demo_model_dir / "model.safetensors")
    assert sorted(loaded) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    assert isinstance(load_tokenizer(ckpt), MistralCommonTokenizer)


def test_mistral_tokenizer_encodes_chat_and_fim(demo_model_dir: Path) -> None:
    tok = load_tokenizer(inspect_checkpoint(demo_model_dir))
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == 1 and ids[1] == 3  # <s> [INST]
    assert tok.decode(ids).strip().startswith("Hello") or "Hello" in tok.decode(ids)
    assert tok.supports_fim
    fim = tok.encode_fim("def f(", "return 1")
    assert fim[:2] == [1, 13]  # <s> [SUFFIX]: Codestral order puts the suffix first


def test_tool_calls_are_parsed_from_token_ids_v3(demo_model_dir: Path) -> None:
    tok = load_tokenizer(inspect_checkpoint(demo_model_dir))
    body = tok.encode_text('[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    parsed = tok.parse_output([tok.tool_calls_id, *body, 2], tools_enabled=True)
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # The same tokens with tools off are plain text, and text alone is never a call.
    assert parsed.tool_calls and not tok.parse_output(body, tools_enabled=True).tool_calls


def v11_tekken_file(directory: Path) -> Path:
    """mistral-common's tekken file re-labelled v11, with the [ARGS] and [CALL_ID] tokens."""
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(
        (Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text()
    )
    data["config"]["version"] = "v11"
    special = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    for name in ("[ARGS]", "[CALL_ID]"):
        special.append({"rank": len(special), "token_str": name, "is_control": True})
    data["special_tokens"] = special
    path = directory / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def test_tool_calls_are_parsed_from_token_ids_v11_format(tmp_path: Path) -> None:
    tok = MistralCommonTokenizer(v11_tekken_file(tmp_path))
    assert tok.version == 11 and tok.args_id is not None
    ids = [
        tok.tool_calls_id,
        *tok.encode_text("get_weather"),
        tok.args_id,
        *tok.encode_text('{"city": "Paris"}'),
        tok.tool_calls_id,
        *tok.encode_text("get_time"),
        tok.args_id,
        *tok.encode_text("{}"),
    ]
    parsed = tok.parse_output(ids, tools_enabled=True)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
