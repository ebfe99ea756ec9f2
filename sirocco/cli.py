"""`sirocco serve | demo-model`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sirocco import __version__
from sirocco.config import Settings, add_serve_arguments, settings_from_args

log = logging.getLogger("sirocco")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sirocco", description="A self-hosted implementation of the Mistral AI platform API."
    )
    parser.add_argument("--version", action="version", version=f"sirocco {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="start the API server", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_serve_arguments(serve)
    demo = commands.add_parser("demo-model", help="write the tiny random demo checkpoint")
    demo.add_argument("directory", type=Path, help="where to write it (created if missing)")
    return parser


def configure_logging(level: str) -> None:
    from sirocco.api.log_redaction import redact_root_handlers

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    redact_root_handlers()


def serve(settings: Settings) -> int:
    """Load the models, then listen until Ctrl-C."""
    import uvicorn

    from sirocco.api.app import create_app
    from sirocco.api.log_redaction import uvicorn_log_config
    from sirocco.api.state import ServerState
    from sirocco.engine.config import set_compute_threads
    from sirocco.models.loader import ModelLoadError
    from sirocco.serving.loading import load_models

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("data dir: %s", settings.data_dir)
    set_compute_threads(settings.threads)
    try:
        registry = load_models(settings)
    except ModelLoadError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = ServerState(settings=settings, registry=registry)
    app = create_app(state)
    for served in registry.all():
        names = ", ".join([served.id, *served.aliases])
        log.info("serving %s (%s): %s", names, served.kind, served.source or served.description)
    if settings.auth_enabled:
        log.info(
            "auth is ON: /v1 routes need 'Authorization: Bearer <key>' (%d key%s)",
            len(settings.api_keys),
            "" if len(settings.api_keys) == 1 else "s",
        )
        if settings.api_key_on_command_line:
            log.warning(
                "an API key was given with --api-key: every local user can read it in `ps`; "
                "pass keys with SIROCCO_API_KEY or --api-key-file instead"
            )
    else:
        log.warning(
            "auth is OFF: anyone who can reach %s:%d can use the API "
            "(set --api-key or SIROCCO_API_KEY to require a key)",
            settings.host,
            settings.port,
        )
    if settings.public_url is None and settings.host in ("0.0.0.0", "::", ""):
        log.warning(
            "signed file URLs point at %s, which clients cannot reach; set --public-url",
            settings.base_url,
        )
    log.info(
        "limits: request bodies %d bytes, uploads %d bytes, %d concurrent uploads, "
        "read timeout %g s; signed URLs on %s",
        settings.max_request_size,
        settings.max_upload_size,
        settings.max_concurrent_uploads,
        settings.read_timeout,
        settings.base_url,
    )
    log.info("listening on http://%s:%d (docs at /docs)", settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(),
        timeout_graceful_shutdown=5,
    )
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo-model":
        from sirocco.models.demo import write_demo_model

        path = write_demo_model(args.directory)
        print(f"wrote the demo checkpoint to {path}")
        return 0
    return serve(settings_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
