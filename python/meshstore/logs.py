"""Structured logging for the whole package: one setup, two line formats.

Every meshstore logger lives under ``meshstore`` (``meshstore.node``,
``meshstore.eventloop``...). ``setup()`` installs one handler on that logger:

- key=value lines (default)::

    ts=2025-01-01T12:00:00.123Z level=info logger=meshstore.node msg=listening address=127.0.0.1:50051 node_id=a

- JSON lines (``json=True``, ``meshstore serve --log-json``)::

    {"ts": "...", "level": "info", "logger": "meshstore.node", "msg": "listening", "address": "...", "node_id": "a"}

Structured fields travel in the record's ``fields`` attribute; ``event()`` is the
short way to log one::

    event(log, logging.INFO, "listening", address=addr, node_id=node)

The level comes from the argument, else ``MESHSTORE_LOG_LEVEL``, else INFO.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["ENV_LEVEL", "JsonFormatter", "KeyValueFormatter", "event", "parse_level", "setup"]

ENV_LEVEL = "MESHSTORE_LOG_LEVEL"
ROOT_LOGGER = "meshstore"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
# The attributes every LogRecord has; anything else passed through ``extra`` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "fields"}


def parse_level(level: str | int | None) -> int:
    """A level from a name (any case) or number; None reads ``MESHSTORE_LOG_LEVEL``
    (default INFO). ValueError names the accepted values."""
    if level is None:
        level = os.environ.get(ENV_LEVEL) or "info"
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    name = str(level).strip().lower()
    if name in _LEVELS:
        return _LEVELS[name]
    if name.isdigit():
        return int(name)
    raise ValueError(f"unknown log level {level!r} (expected one of debug, info, warning, error, critical)")


def event(logger: logging.Logger, level: int, msg: str, /, exc_info: Any = None, **fields: Any) -> None:
    """Logs ``msg`` with structured ``fields`` (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", None) or {})
    for key, value in vars(record).items():  # plain ``extra={...}`` works too
        if key not in _STANDARD and not key.startswith("_"):
            fields.setdefault(key, value)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{whole}.{int(record.msecs):03d}Z"


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={_timestamp(record)}", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={_kv_value(record.getMessage())}"]
        parts += [f"{key}={_kv_value(value)}" for key, value in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_kv_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields that are not JSON types are rendered with str()."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler):
    """Marks the handler ``setup`` installed, so a second call replaces it."""


def setup(level: str | int | None = None, *, json: bool = False, stream: TextIO | None = None) -> logging.Logger:
    """Configures the ``meshstore`` logger (idempotent: replaces a previous setup).
    Records do not propagate to the root logger, so lines are never doubled."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else KeyValueFormatter())
    logger.addHandler(handler)
    logger.setLevel(parse_level(level))
    logger.propagate = False
    return logger
