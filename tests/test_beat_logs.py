"""Beat's log while the broker is away: each missed run is one readable warning line.

Runs beat exactly as ``make run`` starts it (its Procfile's beat line) against a private
``redis-server`` (never the shared one) and this session's database, whose sweep is due every
second; stops that Redis and reads what beat wrote for the ticks that followed. Celery's beat
logged each as ERROR "Message Error" with the formatted stack and the traceback (8 KB a tick).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lab.stack import wait_until
from tests.private_broker import make_run_argv, private_broker_stack

pytestmark = pytest.mark.django_db(transaction=True)

SENT = "Scheduler: Sending due task sagas: sweep stuck sagas"


def test_a_sweep_the_broker_did_not_take_is_one_warning_line(tmp_path: Path):
    stack = private_broker_stack(tmp_path, "beatlog")
    try:
        beat = stack.supervisor.start("beat", make_run_argv("beat"), log_name="beat.log")
        wait_until(lambda: SENT in beat.log_tail(10**7) or not beat.alive, 60, "a first sweep")
        assert beat.alive, beat.log_tail(4000)
        before = len(beat.log_tail(10**7))
        stack.stop_redis(signal.SIGKILL)
        # Beat sends one entry at a time and logs its outcome before the next tick: once a
        # second send has started, everything the first one caused is in the log.
        wait_until(
            lambda: beat.log_tail(10**7)[before:].count(SENT) >= 2 or not beat.alive,
            60,
            "two sweeps due while the broker is down",
        )
        assert beat.alive, beat.log_tail(4000)
        after = beat.log_tail(10**7)[before:]
    finally:
        stack.close()

    start = after.index(SENT)
    second = after.index(SENT, start + 1)
    # From the line of the first send while the broker is down to the line of the second.
    first = after[after.rfind("\n", 0, start) + 1 : after.rfind("\n", 0, second)]
    lines = first.strip().splitlines()
    assert SENT in lines[0], first
    # What became of it: WARNING lines, one per report and each whole on its line. Under load
    # beat may report the same missed run twice (it tried again before the next tick), so
    # the count is not fixed; what is, is that nothing else is logged.
    reports = lines[1:]
    assert reports, first
    for line in reports:
        assert "level='warning'" in line and "beat: missed a run" in line, first
    assert "Connection refused" in reports[0] and "sweep stuck sagas" in reports[0]
    assert "Traceback" not in after and "level='error'" not in after, after[-4000:]


def test_a_send_that_failed_for_another_reason_keeps_its_traceback(caplog):
    """Only a broker that is away is shortened: any other cause (a bug) stays an ERROR with
    its traceback."""
    import logging

    from celery.beat import SchedulingError

    caplog.set_level(logging.INFO)
    try:
        try:
            raise ValueError("a task argument that does not serialize")
        except ValueError:
            raise SchedulingError("Couldn't apply scheduled task x: bad") from None
    except SchedulingError as error:
        logging.getLogger("celery.beat").error(
            "Message Error: %s\n%s", error, ["stack"], exc_info=True
        )
    (record,) = [r for r in caplog.records if r.name == "celery.beat"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_beat_starts_with_one_json_line_instead_of_celerys_banner(tmp_path: Path):
    """Celery printed "celery beat v... is starting." and its banner (art, broker, loader,
    scheduler, log file, interval) straight to stdout, the only beat lines that were not JSON
    under LOG_FORMAT=json. Its facts are one ``beat.starting`` line now."""
    stack = private_broker_stack(tmp_path, "beatstart")
    try:
        beat = stack.supervisor.start(
            "beat",
            make_run_argv("beat"),
            env={**stack.env, "LOG_FORMAT": "json"},
            log_name="beat.log",
        )
        wait_until(lambda: SENT in beat.log_tail(10**7) or not beat.alive, 60, "a first sweep")
        assert beat.alive, beat.log_tail(4000)
        log = beat.log_tail(10**7)
    finally:
        stack.close()
    # What beat wrote up to its first send: the log's first line is lab.supervisor's own.
    started = log[: log.index(SENT)].splitlines()[1:]
    written = [line for line in started if line.strip()]

    assert [line for line in written if not line.startswith("{")] == [], written
    assert "celery beat v" not in log and "Configuration ->" not in log, log[:4000]
    lines = [json.loads(line) for line in written[:-1]]  # the last one is the first send's
    [start] = [line for line in lines if line["event"] == "beat.starting"]
    assert start["level"] == "info" and start["logger"] == "config.celery", start
    host = stack.env["CELERY_BROKER_URL"].removeprefix("redis://")
    assert start["transport"].startswith("redis://") and start["transport"].endswith(host)
    assert start["scheduler"] == "django_celery_beat.schedulers.DatabaseScheduler"
    assert "sagas: sweep stuck sagas" in start["entries"], start
    assert start["max_interval"] > 0
