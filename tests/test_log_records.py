"""A log line's stdlib record skips what no rendered line shows (caller, thread, process).

Workers write one line per saga transition; working out the caller walks the stack on every
line. The rendered JSON and key=value lines carry structlog's fields only, so nothing is lost.
"""

from __future__ import annotations

import json
import logging

import structlog


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_transition_line_is_rendered_whole_without_caller_or_process_lookups():
    from django.conf import settings

    keep = _Keep()
    keep.setFormatter(logging.getLogger().handlers[0].formatter)
    engine = logging.getLogger("sagas.engine")
    engine.addHandler(keep)
    try:
        structlog.get_logger("sagas.engine").info(
            "saga.step_succeeded", saga_id="s-1", step="reserve_inventory", attempt=1
        )
    finally:
        engine.removeHandler(keep)

    (record,) = keep.records
    assert record.funcName == "(unknown function)" and record.lineno == 0  # no stack walk
    assert record.threadName is None and record.processName is None and record.process is None
    line = keep.format(record)
    fields = json.loads(line) if settings.LOG_FORMAT == "json" else None
    if fields is not None:
        assert fields["event"] == "saga.step_succeeded" and fields["saga_id"] == "s-1"
        assert fields["level"] == "info" and fields["logger"] == "sagas.engine"
        assert "timestamp" in fields
    else:
        assert "event='saga.step_succeeded'" in line and "saga_id='s-1'" in line
