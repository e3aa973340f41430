"""The doorbell: a Celery message that says "saga X at version V may have work now".

The database row is the truth; the message only wakes a worker, which claims the row (see
:mod:`sagas.store`) and finds a stale or duplicate doorbell fenced off. So ringing never fails
its caller: a lost message is rung again by the sweeper from the database.

The message is the task named :data:`RUN_TASK`, published through the Celery app's task of
that name (``sagas.tasks`` declares it; the sagas app imports that module when it is ready),
so the doorbell needs nothing above it: the task's body (the runner) imports the doorbell,
never the other way round.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

import structlog
from celery import current_app
from django.conf import settings
from django.db import transaction
from kombu import Queue
from kombu.utils.uuid import uuid

from sagas import metrics, pumps
from sagas.timing import doorbell_only, task_step_timeout, task_time_limits

log = structlog.get_logger("sagas.engine")

#: The name of the task a doorbell sends (declared in ``sagas.tasks``).
RUN_TASK = "sagas.run"


def _run_task() -> Any:
    """The run task of the current Celery app (what ``shared_task``'s proxy resolves to)."""
    return current_app.tasks[RUN_TASK]


# After a failed publish, skip the broker for this long: the sweeper rings those sagas later,
# and requests and steps do not each pay a connect timeout while the broker is down.
_BREAKER_SECONDS = 2.0
_broker_down_until = 0.0


def _limits(timeout: float | None) -> dict[str, float]:
    """Message options giving a task the time limits of a step with ``timeout``, or of the
    longest step any task may meet (:func:`~sagas.timing.task_step_timeout`) if that is longer;
    none when that is the default timeout (the task's annotations already say so)."""
    shared = task_step_timeout()
    sized = shared if timeout is None else max(timeout, shared)
    if sized == settings.SAGA_STEP_TIMEOUT:
        return {}
    soft, hard = task_time_limits(sized)
    return {"soft_time_limit": soft, "time_limit": hard}


#: The message header that gives a doorbell's task a pump slot (see :mod:`sagas.pumps`).
PUMP_HEADER = "saga_pump"


def ring(
    saga_id: Any,
    version: int,
    countdown: float | None = None,
    timeout: float | None = None,
    *,
    due_now: bool = False,
    pump: str | None = None,
) -> None:
    """Send "saga X at version V may have work". Never raises: the row is already safe.

    A broker that is down or restarting must not fail the request or the step that committed;
    the sweeper rings again once the broker is back. ``timeout`` is the timeout of the step
    the saga will run: the task gets time limits that fit it.

    ``due_now``: the saga's row is due now with no live lease (a start, a hand-over), so a pump
    can find it (:mod:`sagas.pumps`). If its step fits any task's time limits, the doorbell
    asks for a pump slot first: with every slot taken it is not sent at all. The doorbell of a
    step too long for any other task (:func:`~sagas.timing.doorbell_only`) is always sent
    (pumps pass such sagas by; their lease has run out rather than being none, see
    ``sagas.store.released_lease``). ``pump``: a slot this caller already holds, handed on to
    the task.
    """
    global _broker_down_until
    if time.monotonic() < _broker_down_until:
        log.debug("saga.doorbell_skipped", saga_id=str(saga_id), version=version)
        if pump is not None:
            pumps.release(pump)
        return
    if due_now and pump is None and not countdown and not doorbell_only(timeout):
        slot = pumps.acquire()
        if slot is None:
            metrics.DOORBELLS_COALESCED.inc()
            log.debug("saga.doorbell_coalesced", saga_id=str(saga_id), version=version)
            return
        if isinstance(slot, str):
            pump = slot
    run_saga = _run_task()
    try:
        run_saga.apply_async(
            (str(saga_id), version),
            countdown=countdown if countdown and countdown > 0 else None,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.05, "interval_step": 0.2},
            headers=None if pump is None else {PUMP_HEADER: pump},
            **_limits(timeout),
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure is logged and forgotten
        _broker_down_until = time.monotonic() + _BREAKER_SECONDS
        log.warning("saga.doorbell_failed", saga_id=str(saga_id), version=version, error=repr(exc))
        if pump is not None:
            pumps.release(pump)  # nobody will run it: a later ring may take the slot


def ring_on_commit(
    saga_id: Any,
    version: int,
    countdown: float | None = None,
    timeout: float | None = None,
    *,
    due_now: bool = False,
) -> None:
    """:func:`ring` once the caller's transaction commits: never for a change rolled back."""
    transaction.on_commit(lambda: ring(saga_id, version, countdown, timeout, due_now=due_now))


def ring_many(
    doorbells: Sequence[tuple[Any, int, float | None]],
    spread: float = 0.0,
    countdowns: Sequence[float] | None = None,
) -> None:
    """Ring for many sagas at once; never raises, like :func:`ring`.

    ``spread``: each doorbell gets a random countdown of up to this many seconds, so a batch
    released at once (the sagas parked on a provider that came back) arrives in a wave rather
    than in one instant. ``countdowns``: each doorbell's own countdown instead (the caller made
    each row due at that moment).

    The sweeper rings up to ``SAGA_SWEEP_BATCH`` sagas per tick. Through ``apply_async`` each
    doorbell costs about 0.6 ms: a fresh Redis client and round trip, a queue declaration, and
    ``send_task`` working out the same routing and options again. Here the route is worked out
    once, the queue declared once, and each message is built and published with Celery's own
    ``create_task_message`` / ``send_task_message`` (so it is the same task message a worker
    gets from ``apply_async``) inside a kombu producer batch: one pipelined round trip on
    Redis, one publish after another where a transport cannot batch (AMQP). If the batch
    fails, each doorbell goes through :func:`ring` instead (reconnecting, behind the breaker);
    what still fails is forgotten: every saga rung here had its ``sweeps`` counter bumped, so
    a later sweep rings it again after a backoff.
    """
    if not doorbells:
        return
    if time.monotonic() < _broker_down_until:
        log.debug("saga.doorbells_skipped", count=len(doorbells))
        return
    run_saga = _run_task()
    app, name = run_saga.app, run_saga.name
    amqp = app.amqp
    # Each doorbell's countdown, worked out once: the one-by-one fallback sends the same.
    delays = [_within(spread) for _ in doorbells] if countdowns is None else map(_at, countdowns)
    delays = list(delays)
    try:
        route = amqp.router.route({}, name, (str(doorbells[0][0]), doorbells[0][1]), {}, run_saga)
        with app.producer_or_acquire() as producer, producer.batch(max_size=len(doorbells)):
            declare: list[Any] | None = None  # the first message declares the queue; not the rest
            for (saga_id, version, timeout), countdown in zip(doorbells, delays, strict=True):
                args = (str(saga_id), version)
                message = amqp.create_task_message(
                    uuid(),
                    name,
                    args,
                    {},
                    countdown=countdown,
                    ignore_result=True,
                    argsrepr=repr(args),
                    kwargsrepr="{}",
                    **_limits(timeout),
                )
                amqp.send_task_message(
                    producer, name, message, declare=declare, retry=False, **route
                )
                declare = []
    except Exception as exc:  # noqa: BLE001 - any broker failure: fall back to one by one
        # The pooled connection may have died with a broker restart (py-amqp does not
        # reconnect by itself). ring() publishes with a reconnecting retry; if the broker is
        # really down, its first failure opens the breaker and the rest are skipped at once.
        # A doorbell sent twice (some went out before the failure) is fenced.
        log.warning("saga.doorbells_batch_failed", count=len(doorbells), error=repr(exc))
        for (saga_id, version, timeout), countdown in zip(doorbells, delays, strict=True):
            ring(saga_id, version, countdown, timeout)


def _at(countdown: float) -> float | None:
    """A countdown as a message option (``None``: at once)."""
    return countdown if countdown > 0 else None


def _within(spread: float) -> float | None:
    """A random countdown of up to ``spread`` seconds (``None``: at once)."""
    return random.uniform(0.0, spread) if spread > 0 else None


def queued_doorbells(queue_name: str | None = None) -> int | None:
    """Messages waiting in the saga queue (or ``queue_name``), as the broker counts them;
    ``None`` if it cannot say.

    A queue declaration returns the count on every transport the project uses (Redis: the
    list's length; AMQP: ``message_count``; the file broker: its files). Messages a worker has
    already taken (prefetched, or held for a countdown) are not counted.
    """
    if time.monotonic() < _broker_down_until:
        return None
    run_saga = _run_task()
    app = run_saga.app
    try:
        if queue_name is None:
            queue = app.amqp.router.route({}, run_saga.name, (), {}, run_saga)["queue"]
        else:
            queue = app.amqp.queues.get(queue_name) or Queue(queue_name)
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
            channel = conn.channel()
            try:
                return int(queue.bind(channel).queue_declare().message_count)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    except Exception as exc:  # noqa: BLE001 - no count: the sweeper rings as if it were empty
        log.info("saga.queue_depth_unknown", error=repr(exc))
        return None
