"""Server settings: every `sirocco serve` flag, each also settable as a SIROCCO_* variable.

The flag table below is the single source: the CLI builds its parser from it and the
README documents it. An environment variable is named after its flag
(`--max-num-seqs` -> `SIROCCO_MAX_NUM_SEQS`); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Settings:
    """What one `sirocco serve` process serves and how."""

    models: list[str] = field(default_factory=list)
    served_model_names: list[str] = field(default_factory=list)
    embedding_model: str | None = None
    dtype: str = "auto"
    quantization: str = "auto"
    threads: int | None = None
    engine: str = "process"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    data_dir: Path = Path("data")
    log_level: str = "info"
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_n: int = 16
    max_upload_size: int = 512 * 1024 * 1024
    database_url: str | None = None
    max_waiting: int | None = None
    request_timeout: float | None = None
    max_request_size: int = 16 * 1024 * 1024
    read_timeout: float = 30.0
    max_concurrent_uploads: int = 8
    public_url: str | None = None
    api_key_file: Path | None = None
    #: Whether a key came from `--api-key` on the command line (visible in `ps`).
    api_key_on_command_line: bool = False

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def base_url(self) -> str:
        """Where clients reach this server: `--public-url`, else the listening address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1000' -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1024**3,
    }
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abgikm")
    unit = s[len(number) :]
    if unit not in units or not number:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with B, KB, MB, GB, MiB or GiB"
        )
    try:
        return int(float(number) * units[unit])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from exc


# (flag, settings field, argparse keywords). Order is the order of `--help`.
FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--model",
        "models",
        dict(
            action="append",
            metavar="PATH_OR_ID",
            help="model to serve: a local directory (Hugging Face or Mistral layout), a GGUF "
            "file, or a Hugging Face repo id; repeatable. Default: the built-in models",
        ),
    ),
    (
        "--served-model-name",
        "served_model_names",
        dict(
            action="append",
            metavar="NAME",
            help="id to serve the (first) --model under; repeat to add aliases",
        ),
    ),
    (
        "--embedding-model",
        "embedding_model",
        dict(
            metavar="PATH",
            help="encoder model directory (sentence-transformers layout) served as mistral-embed",
        ),
    ),
    (
        "--dtype",
        "dtype",
        dict(
            choices=["auto", "float32", "bfloat16", "float16"],
            help="weight and activation dtype; auto picks bfloat16 where the hardware runs it "
            "fast, else float32",
        ),
    ),
    (
        "--quantization",
        "quantization",
        dict(
            choices=["auto", "none", "int8", "int4"],
            help="weight-only quantized linear layers: int4 (a GGUF's own Q4_1 blocks where "
            "it has them) or int8 (a scale per 32 weights); auto serves a GGUF file at its own "
            "precision (Q4_x: int4, Q8_0: int8), a float checkpoint in float",
        ),
    ),
    (
        "--threads",
        "threads",
        dict(
            type=int,
            metavar="N",
            help="compute threads of the model (PyTorch's and Sirocco's kernels); default: "
            "every core for an engine process, all but one (left to the server) in the "
            "server's own process",
        ),
    ),
    (
        "--engine",
        "engine",
        dict(
            choices=["process", "thread"],
            help="where each generative model's step loop runs: process (a process of its "
            "own, so HTTP and streaming never take the GIL from the model) or thread (in the "
            "server process: one process fewer, slower under load)",
        ),
    ),
    ("--device", "device", dict(choices=["auto", "cpu", "cuda"], help="where models run")),
    ("--host", "host", dict(help="address to listen on")),
    ("--port", "port", dict(type=int, help="port to listen on")),
    (
        "--api-key",
        "api_keys",
        dict(
            action="append",
            metavar="KEY",
            help="require 'Authorization: Bearer KEY' on /v1 routes; repeatable "
            "(SIROCCO_API_KEY may hold several, comma-separated). A key on the command line "
            "is visible to every local user in `ps`: prefer SIROCCO_API_KEY or --api-key-file",
        ),
    ),
    (
        "--api-key-file",
        "api_key_file",
        dict(
            type=Path,
            metavar="PATH",
            help="file of API keys, one per line (blank lines and # comments skipped); "
            "added to --api-key / SIROCCO_API_KEY",
        ),
    ),
    (
        "--data-dir",
        "data_dir",
        dict(type=Path, help="database, uploaded files, fine-tuned adapters and model caches"),
    ),
    ("--log-level", "log_level", dict(choices=["debug", "info", "warning", "error"])),
    (
        "--kv-cache-memory",
        "kv_cache_memory",
        dict(
            type=parse_size,
            metavar="SIZE",
            help="memory for the KV cache, e.g. 2GiB (default: a share of free memory)",
        ),
    ),
    ("--max-num-seqs", "max_num_seqs", dict(type=int, help="most sequences decoded in one batch")),
    (
        "--max-num-batched-tokens",
        "max_num_batched_tokens",
        dict(type=int, help="token budget of one engine step (prefill chunks + decodes)"),
    ),
    ("--max-n", "max_n", dict(type=int, help="largest `n` a chat request may ask for")),
    (
        "--max-upload-size",
        "max_upload_size",
        dict(type=parse_size, metavar="SIZE", help="largest file upload accepted (413 beyond it)"),
    ),
    (
        "--database-url",
        "database_url",
        dict(
            metavar="URL",
            help="SQLAlchemy URL of the metadata database (default: SQLite in the data dir)",
        ),
    ),
    (
        "--max-waiting",
        "max_waiting",
        dict(
            type=int,
            metavar="N",
            help="requests per model that may wait beyond the --max-num-seqs running ones; "
            "past it a 429 with Retry-After (default: twice the batch the KV cache holds)",
        ),
    ),
    (
        "--request-timeout",
        "request_timeout",
        dict(
            type=float,
            metavar="SECONDS",
            help="a generation still running this long after it arrived ends with an error "
            "(504, or a stream's finish_reason error) and frees its KV (default: off)",
        ),
    ),
    (
        "--max-request-size",
        "max_request_size",
        dict(
            type=parse_size,
            metavar="SIZE",
            help="largest request body other than a file upload (413 beyond it, decided from "
            "Content-Length or as the bytes arrive, before anything is parsed)",
        ),
    ),
    (
        "--read-timeout",
        "read_timeout",
        dict(
            type=float,
            metavar="SECONDS",
            help="a client that sends no part of its request body for this long gets a 408 "
            "and its connection closed; a partial upload is deleted",
        ),
    ),
    (
        "--max-concurrent-uploads",
        "max_concurrent_uploads",
        dict(
            type=int,
            metavar="N",
            help="file uploads received at the same time; past it a 429 with Retry-After",
        ),
    ),
    (
        "--public-url",
        "public_url",
        dict(
            metavar="URL",
            help="base URL clients reach this server at, used in signed file URLs "
            "(default: http://HOST:PORT; never the request's Host header)",
        ),
    ),
]


def env_name(flag: str) -> str:
    return "SIROCCO_" + flag.lstrip("-").replace("-", "_").upper()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for flag, dest, kwargs in FLAGS:
        kwargs = dict(kwargs)
        default = getattr(defaults, dest)
        shown = default if not isinstance(default, list) or default else None
        kwargs["help"] = f"{kwargs.get('help', '')} [env {env_name(flag)}; default {shown}]"
        parser.add_argument(flag, dest=dest, default=None, **kwargs)


def _from_env(flag: str, dest: str, kwargs: dict[str, Any], environ: dict[str, str]) -> Any:
    raw = environ.get(env_name(flag))
    if flag == "--api-key" and raw is None:
        raw = environ.get("SIROCCO_API_KEY")
    if raw is None or raw == "":
        return None
    if kwargs.get("action") == "append":
        return [part.strip() for part in raw.split(",") if part.strip()]
    convert = kwargs.get("type", str)
    try:
        value = convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(f"error: {env_name(flag)}={raw!r} is invalid: {exc}") from None
    choices = kwargs.get("choices")
    if choices and value not in choices:
        raise SystemExit(f"error: {env_name(flag)}={raw!r}: choose from {', '.join(choices)}")
    return value


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Merge command-line flags over SIROCCO_* variables over defaults."""
    environ = dict(os.environ if environ is None else environ)
    settings = Settings()
    for flag, dest, kwargs in FLAGS:
        value = getattr(args, dest, None)
        if value is None:
            value = _from_env(flag, dest, kwargs, environ)
        if value is not None:
            setattr(settings, dest, value)
    settings.data_dir = Path(settings.data_dir).expanduser().resolve()
    settings.api_key_on_command_line = bool(getattr(args, "api_keys", None))
    if settings.api_key_file is not None:
        settings.api_keys = [*settings.api_keys, *read_key_file(settings.api_key_file)]
    check_limits(settings)
    return settings


def read_key_file(path: Path) -> list[str]:
    """API keys from a file: one per line; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the API key file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise SystemExit(f"error: the API key file {path} holds no key")
    return keys


def check_limits(settings: Settings) -> None:
    """Limits that must be positive for the server to accept anything."""
    if settings.threads is not None and settings.threads <= 0:
        raise SystemExit(f"error: --threads must be positive, got {settings.threads}")
    for flag, value in (("--max-request-size", settings.max_request_size),
                        ("--read-timeout", settings.read_timeout),
                        ("--max-concurrent-uploads", settings.max_concurrent_uploads)):
        if value <= 0:
            raise SystemExit(f"error: {flag} must be positive, got {value}")
