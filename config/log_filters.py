"""Logging filters that turn expected, harmless events into one readable line.

Attached to third-party loggers in ``LOGGING`` (config/settings.py), or to its one handler
for a family of loggers (a logger's filter does not see its children's records). Each
rewrites a record in place; none drops one.
"""

from __future__ import annotations

import logging


class AckOnLostConnection(logging.Filter):
    """kombu's "Couldn't ack <tag>" on a lost broker connection: a WARNING line, no traceback.

    With late acknowledgement a task that finishes while the broker is away (a restart) cannot
    acknowledge its message; kombu logs that as CRITICAL with the whole redis/amqp traceback.
    Nothing is wrong: the broker delivers the message again, and the saga engine fences the
    repeated doorbell as stale. Celery hands kombu only its connection errors for this, so every
    record of it is one of those.
    """

    PREFIXES = ("Couldn't ack", "Couldn't reject")

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(self.PREFIXES)
            and isinstance(record.args, tuple)
            and len(record.args) == 2
        ):
            tag, error = record.args
            verb = "ack" if record.msg.startswith("Couldn't ack") else "reject"
            record.msg = (
                "Couldn't %s message %s: broker connection lost (%s); the broker delivers it "
                "again and a repeated doorbell is fenced as stale"
            )
            record.args = (verb, tag, error)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def _broker_connection_errors() -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker is not there, for each transport installed."""
    from kombu.exceptions import OperationalError

    errors: list[type[BaseException]] = [OperationalError, OSError]
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        errors += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover - redis is a dependency, amqp is optional
        pass
    try:
        from amqp.exceptions import ConnectionError as AmqpConnectionError

        errors.append(AmqpConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class MissedScheduledRun(logging.Filter):
    """Beat's "Message Error" when the broker did not take a due task: one WARNING line.

    Celery's beat logs a send that failed at ERROR with the formatted stack and the traceback
    (some 8 KB for every tick the broker is away). When the cause is the broker connection,
    the run is simply missed: every periodic task here is idempotent and beat sends it again
    at its next tick. Any other cause (a bug) keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not (
            isinstance(record.msg, str)
            and record.msg.startswith("Message Error:")
            and isinstance(record.args, tuple)
            and record.args
            and isinstance(record.args[0], BaseException)
        ):
            return True
        error = record.args[0]
        cause: BaseException | None = error
        errors = _broker_connection_errors()
        for _ in range(5):  # SchedulingError -> kombu's OperationalError -> redis/socket error
            cause = cause.__cause__ or cause.__context__ if cause is not None else None
            if cause is None or isinstance(cause, errors):
                break
        if cause is None:
            return True
        record.msg = (
            "beat: missed a run, the broker did not take it (%s); sent again at the next tick"
        )
        record.args = (error,)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


class SuspiciousRequest(logging.Filter):
    """Django's ``django.security.*`` ERROR for a request it answers ``400``: one WARNING line,
    no traceback.

    Django logs every ``SuspiciousOperation`` (a filter the ops console refuses, such as
    ``?secret__startswith=``; a ``Host`` header not allowed; a malformed upload) at ERROR with
    its traceback, then answers ``400``. The request was the client's mistake or a probe, a
    4xx like any other (gunicorn's access line has it already); the traceback shows only
    Django's frames. The line keeps the exception's class and message and the request's
    method and path, not its query string (a refused filter's value may be a guessed secret).
    On the handler: a filter on ``django.security`` would not see its children's records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from django.core.exceptions import SuspiciousOperation

        if not (
            record.name.startswith("django.security.")
            and getattr(record, "status_code", None) == 400
            and record.exc_info
            and isinstance(record.exc_info[1], SuspiciousOperation)
        ):
            return True
        error = record.exc_info[1]
        request = getattr(record, "request", None)
        method, path = getattr(request, "method", None), getattr(request, "path", None)
        where = f" {method} {path}" if method and path else ""
        record.msg = "%s: %s; answered 400 Bad Request%s"
        record.args = (type(error).__name__, error, f" to{where}" if where else "")
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True
