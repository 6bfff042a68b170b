"""Logs: one JSON object per line (text lines on a terminal), carrying the request id of the request being served."""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import re
import sys
import uuid
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("kawhi_request_id", default=None)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

# LogRecord attributes that are not user "extra" fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def accept_request_id(value: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a fresh one."""
    if value and _VALID_ID.match(value):
        return value
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        rid = extra.pop("request_id", None) or request_id_var.get()
        if extra:
            line += " " + json.dumps(extra, default=str, separators=(",", ":"))
        return f"{line} [{rid}]" if rid else line


def configure_logging(level: str = "info", json_logs: bool | None = None) -> None:
    """Route the root, uvicorn and kawhi loggers to one stderr handler: JSON lines, or text
    lines (``json_logs`` False, or None and stderr a terminal: a person reading it)."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # kawhi logs each request itself
