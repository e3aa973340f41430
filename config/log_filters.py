"""Logging filters that turn expected, harmless events into one readable line.

Attached to third-party loggers in ``LOGGING`` (config/settings.py). Each rewrites a record
in place; none drops one.
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
