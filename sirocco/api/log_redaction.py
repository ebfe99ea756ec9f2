"""Secrets never reach a log line: query values of parameters that carry credentials
(a signed URL's `signature`, a key sent as `?api_key=`) are replaced by `[redacted]`.

`RedactSecrets` is a `logging.Filter` put on every handler the server logs through: the
root logger's and uvicorn's (the access log writes each request's path with its query).
"""

from __future__ import annotations

import logging
import re
from typing import Any

#: Query parameters whose values are credentials (signed URLs use `signature`).
SECRET_PARAMETERS = ("signature", "sig", "key", "api_key", "apikey", "api-key", "token",
                     "access_token", "auth", "password", "secret", "x-api-key")

_NAMES = "|".join(re.escape(p) for p in SECRET_PARAMETERS)
_SECRET_QUERY = re.compile(rf"(?P<name>[?&;](?:{_NAMES})=)[^&;#\s\"']*", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter replaced."""
    return _SECRET_QUERY.sub(lambda m: m.group("name") + REDACTED, text)


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites a record's message; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn.access"):
            # its formatter unpacks the arguments (client, method, path, ...): keep the tuple
            if isinstance(record.args, tuple):
                record.args = tuple(_redact_value(a) for a in record.args)
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return True
        record.msg, record.args = redact(message), None
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration, with `RedactSecrets` on each of its handlers."""
    from uvicorn.config import LOGGING_CONFIG

    config = {key: (dict(value) if isinstance(value, dict) else value)
              for key, value in LOGGING_CONFIG.items()}
    config["filters"] = {"redact_secrets": {"()": RedactSecrets}}
    config["handlers"] = {name: {**handler, "filters": ["redact_secrets"]}
                          for name, handler in LOGGING_CONFIG["handlers"].items()}
    return config


def redact_root_handlers() -> None:
    """Put `RedactSecrets` on the root logger's handlers (where sirocco's loggers write)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
