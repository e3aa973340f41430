"""The project's structlog loggers ask the stdlib level before running their processors.

A line whose level is off costs no processing (no timestamp, no context merge); a line whose
level is on is processed and reaches ``logging`` exactly as before.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import structlog

from config.structlog_logger import LevelFirstBoundLogger


class _Spy:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        self.events.append(dict(event_dict))
        return event_dict


@pytest.fixture
def spied():
    stdlib = logging.getLogger("tests.level_first")
    spy = _Spy()
    log = structlog.wrap_logger(
        stdlib,
        wrapper_class=LevelFirstBoundLogger,
        processors=[spy, structlog.stdlib.render_to_log_kwargs],
    )
    before = stdlib.level
    yield stdlib, spy, log
    stdlib.setLevel(before)


def test_the_settings_configure_the_level_first_logger():
    assert structlog.get_config()["wrapper_class"] is LevelFirstBoundLogger
    assert isinstance(structlog.get_logger("sagas.engine").bind(), LevelFirstBoundLogger)


def test_a_line_below_the_level_runs_no_processor(spied, caplog):
    stdlib, spy, log = spied
    stdlib.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger=stdlib.name):
        assert log.info("saga.step_succeeded", saga_id="s1") is None
        assert log.debug("saga.debug") is None
    assert spy.events == []
    assert [r for r in caplog.records if r.name == stdlib.name] == []


def test_a_line_at_or_above_the_level_is_processed_and_logged(spied, caplog):
    stdlib, spy, log = spied
    with caplog.at_level(logging.INFO, logger=stdlib.name):
        log.info("saga.step_succeeded", saga_id="s1")
        log.warning("saga.slow", step="pay")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("saga.crashed")
    assert [e["event"] for e in spy.events] == ["saga.step_succeeded", "saga.slow", "saga.crashed"]
    assert spy.events[0]["saga_id"] == "s1"
    records = [r for r in caplog.records if r.name == stdlib.name]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "saga.step_succeeded"),
        (logging.WARNING, "saga.slow"),
        (logging.ERROR, "saga.crashed"),
    ]
    assert records[2].exc_info and records[2].exc_info[0] is ValueError


def test_an_error_line_is_logged_when_only_errors_are(spied, caplog):
    stdlib, spy, log = spied
    with caplog.at_level(logging.ERROR, logger=stdlib.name):
        log.warning("dropped")
        log.error("kept", code=7)
    assert [e["event"] for e in spy.events] == ["kept"]
    assert [r.getMessage() for r in caplog.records if r.name == stdlib.name] == ["kept"]


def test_a_logger_without_levels_gets_every_line():
    captured = structlog.testing.CapturingLogger()
    log = structlog.wrap_logger(captured, wrapper_class=LevelFirstBoundLogger, processors=[])
    log.debug("a")
    log.info("b")
    log.error("c")
    assert [(c.method_name, c.kwargs["event"]) for c in captured.calls] == [
        ("debug", "a"),
        ("info", "b"),
        ("error", "c"),
    ]
