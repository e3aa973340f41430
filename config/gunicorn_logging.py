"""gunicorn's own lines (its error log and its access log) in the project's log format.

gunicorn writes through handlers of its own with plain-text formatters, so with
``LOG_FORMAT=json`` a log shipper got JSON from Django and Celery but Apache-style text from
the server in front of them, and had to parse two formats to count a 5xx. This logger class
keeps gunicorn's handlers (and its ``--access-logfile``/``--error-logfile`` choices) and, when
the format is JSON, gives them a formatter that writes one JSON object per line with the same
keys as the rest of the log (``timestamp``, ``level``, ``logger``, ``event``); an access line
carries the request as fields (``method``, ``path``, ``status``, ``duration_ms``, ...) instead of
a string to parse (so a custom ``--access-logformat`` applies to console lines only). With
``LOG_FORMAT=console`` nothing changes.

``gunicorn.conf.py`` names it as ``logger_class`` for every gunicorn started from the project
root.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import UTC, datetime
from typing import Any

from gunicorn.glogging import Logger as GunicornLogger


def log_format(cfg: Any = None) -> str:
    """``LOG_FORMAT`` as the settings read it: JSON unless it is set or stderr is a terminal.

    gunicorn's ``-e/--env`` values reach ``os.environ`` only after the logger is set up (at
    start and on every HUP), so they are read from its config first: the workers' Django
    settings see them, and gunicorn's own lines must agree.
    """
    env = getattr(cfg, "env", None) or {}
    return (
        env.get("LOG_FORMAT")
        or os.environ.get("LOG_FORMAT")
        or ("console" if sys.stderr.isatty() else "json")
    )


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record; the fields of an access line come from ``record.http``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": "http.request" if hasattr(record, "http") else _message(record),
            "pid": record.process,
        }
        line.update(getattr(record, "http", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def _message(record: logging.LogRecord) -> str:
    """The record's message; one whose arguments do not fit its format still makes a line."""
    try:
        return record.getMessage()
    except (TypeError, ValueError, KeyError):
        return f"{record.msg} {record.args!r}"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Logger(GunicornLogger):
    """gunicorn's logger, writing JSON lines when the project logs JSON."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.json = log_format(cfg) == "json"
        if self.json:
            formatter = JsonLineFormatter()
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    # Only the stream and file handlers gunicorn made itself: a syslog line
                    # keeps gunicorn's program and pid prefix, and the handlers of a
                    # --log-config the user wrote keep the user's formatters.
                    if getattr(handler, "_gunicorn", False) and not isinstance(
                        handler, logging.handlers.SysLogHandler
                    ):
                        handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        if not getattr(self, "json", False):
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        fields = {
            "method": atoms["m"],
            "path": atoms["U"],
            "query": atoms["q"] or "",
            "status": _int_or_none(atoms["s"]),
            "bytes": atoms["B"],
            "duration_ms": round(atoms["D"] / 1000, 3),
            "remote_addr": atoms["h"],
            "user_agent": atoms["a"],
            "referer": atoms["f"],
            "protocol": atoms["H"],
        }
        # The message is gunicorn's own access line, for a handler this formatter does not
        # serve (syslog, a --log-config of the user's); JSON lines take the fields instead.
        try:
            text = self.cfg.access_log_format % self.atoms_wrapper_class(atoms)
            self.access_log.info(text, extra={"http": fields})
        except Exception:  # noqa: BLE001 - as gunicorn's own access(): a log line never fails a request
            self.exception("Failed to write the access log line")
