"""Two fixes to Celery's prefork pool (celery 5.7.0), applied when ``config.celery`` loads.

A worker whose pool processes die (SIGKILL, the OOM killer, a ``crash`` fault) while the broker
connection is being re-established could lose its main process with an "Unrecoverable error":

1. ``ValueError('file descriptor is None')`` in ``AsynPool._track_child_process``. When a pool
   process exits, Celery stops watching it and sets its ``_sentinel_poll`` to ``None`` (it does
   not delete it). On reconnect the consumer registers the pool with the event loop again and
   tracks every process still in the pool list, including one that exited but was not reaped
   yet: ``getattr`` finds ``None`` instead of raising ``AttributeError``, and ``None`` goes to
   ``hub.add_reader``, which raises ``ValueError`` (not the ``OSError`` that
   ``iterate_file_descriptors_safely`` catches). The same family as celery/celery#9250
   (``'NoneType' object has no attribute 'fileno'`` on reconnection).
   Fix: a process that was already untracked has exited; do not track it again. The pool's
   maintenance (run on reconnect and on a timer) reaps and replaces it.

2. ``StopIteration`` in ``AsynPool.get_process_queues``. When the connection is lost the
   consumer flushes the pool, which reaps dead processes and starts replacements at once; a
   replacement takes a free set of pipes, but the pipes of a process killed mid-write are only
   released later, so there may be none free and ``next()`` on an empty generator ends the
   worker. Fix: create a new set of pipes when none is free (as Celery itself does when it
   destroys the pipes of a process killed mid-write).

And one to kombu's Redis transport (kombu 5.7.0):

3. ``AttributeError("'NoneType' object has no attribute 'hostname'")`` in
   ``Channel._connparams``. When the broker goes away the consumer closes its connection and
   starts a new one; closing the transport clears its ``client``, and a channel of it that is
   closed (or acks a message) afterwards tries to build a new Redis client from that ``None``
   to restore its unacknowledged messages. kombu ignores connection errors there, not an
   ``AttributeError``, so the worker's main process ended with an "Unrecoverable error".
   Fix: a channel whose transport was closed raises a Redis ``ConnectionError`` instead,
   which kombu ignores (closing) or logs (acking). Its unacknowledged messages stay in
   Redis's ``unacked`` set and are restored after the visibility timeout; the sweeper rings
   their sagas from the database long before that.

``tests/test_worker_survives_broker_restarts.py`` runs the sequence (pool processes killed
while a private Redis broker restarts, eight times) against a real worker and fails without
these. Remove this module once Celery ships the fixes upstream (the test tells).
"""

from __future__ import annotations

from typing import Any

import redis
from celery.concurrency import asynpool
from kombu.transport import redis as kombu_redis

_UNSET = object()


def _track_child_process(self: Any, proc: Any, hub: Any) -> None:
    fd = getattr(proc, "_sentinel_poll", _UNSET)
    if fd is None:
        return  # untracked because it exited: the pool's maintenance replaces it
    if fd is _UNSET:
        fd = proc._sentinel_poll = asynpool.os.dup(proc._popen.sentinel)
    asynpool.iterate_file_descriptors_safely(
        [fd], None, hub.add_reader, self._event_process_exit, hub, proc
    )


_original_get_process_queues = asynpool.AsynPool.get_process_queues


def _get_process_queues(self: Any) -> Any:
    try:
        return _original_get_process_queues(self)
    except StopIteration:
        queues = self.create_process_queues()
        self._queues[queues] = None
        return queues


_original_connparams = kombu_redis.Channel._connparams


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection.client is None:
        raise redis.exceptions.ConnectionError("the broker connection of this channel is closed")
    return _original_connparams(self, asynchronous=asynchronous)


def apply() -> None:
    """Idempotent: patch the pool class and the Redis channel once per process."""
    channel: Any = kombu_redis.Channel  # patched in place: its typed methods are replaced
    if not getattr(channel, "_sagarunner_patched", False):
        channel._connparams = _connparams
        channel._sagarunner_patched = True
    if getattr(asynpool.AsynPool, "_sagarunner_patched", False):
        return
    asynpool.AsynPool._track_child_process = _track_child_process
    asynpool.AsynPool.get_process_queues = _get_process_queues
    asynpool.AsynPool._sagarunner_patched = True
