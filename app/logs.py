"""Structured logs: one line per record, key=value pairs or JSON, with the request id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

# The id of the request being served, for every log line written while serving it.
request_id_var: ContextVar[str | None] = ContextVar("phototag_request_id", default=None)

# LogRecord's own attributes (and uvicorn's ANSI-coloured copy of its message) are not fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    request_id = getattr(record, "request_id", None) or request_id_var.get()
    if request_id:
        fields["request_id"] = request_id
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), default=str)


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=phototag.access msg="request" status=200``; values with spaces
    or quotes are JSON-quoted so a line always splits back into its pairs."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_value(v)}" for k, v in record_fields(record).items())


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def configure_logging(level: str, fmt: str) -> None:
    """One handler on the root logger (uvicorn's loggers included) writing to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
