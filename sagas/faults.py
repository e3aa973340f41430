"""Fault injection at the one seam every participant operation passes.

``SAGA_FAULTS`` maps an operation name to fault rates::

    {"payments.authorize": {"error": 0.2, "lost_response": 0.05, "latency_ms": [5, 50]},
     "shipping.arrange": {"crash": 0.01}}

Participants decorate their operations with :func:`fault_point`, so tests and the chaos suite
exercise the exact code paths production runs. Unset or empty means no faults and costs one
dict lookup per call.

The same seam fails every call of a provider taken down with ``provider_outage`` (a row every
worker reads, see ``providers.outage``), so an outage is rehearsed on the real code path too.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from django.conf import settings

from providers import outage
from sagas.definition import NothingHappened
from sagas.transactions import (
    after_step_transaction,
    commit_what_the_step_wrote,
    in_step_transaction,
    spoiled,
)

OPERATIONS = frozenset(
    {
        "inventory.reserve",
        "inventory.release",
        "inventory.commit",
        "payments.authorize",
        "payments.void",
        "payments.capture",
        "payments.refund",
        "shipping.arrange",
        "shipping.cancel",
    }
)
RATE_FAULTS = ("error", "lost_response", "crash")


class FaultConfigError(ValueError):
    """``SAGA_FAULTS`` is malformed; the message names the bad key."""


class InjectedError(ConnectionError, NothingHappened):
    """A transient provider error raised before anything happened (the engine knows it took
    no effect: a saga compensating from its step does not undo the step for it)."""


class InjectedTimeout(TimeoutError):
    """The operation took effect, then the caller's response was lost. ``committed``: inside a
    transactional step, the step's writes were committed for it."""

    committed = False


@dataclass(frozen=True)
class FaultSpec:
    error: float = 0.0
    lost_response: float = 0.0
    crash: float = 0.0
    latency_ms: tuple[float, float] | None = None


def parse_faults(raw: str | None) -> dict[str, FaultSpec]:
    """Parse and validate a ``SAGA_FAULTS`` value; raise :class:`FaultConfigError` if malformed."""
    if raw is None or not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FaultConfigError(f"SAGA_FAULTS is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FaultConfigError("SAGA_FAULTS must be a JSON object of operation -> fault rates")
    specs: dict[str, FaultSpec] = {}
    for op, rates in doc.items():
        if op not in OPERATIONS:
            raise FaultConfigError(
                f"SAGA_FAULTS: unknown operation {op!r}; known: {', '.join(sorted(OPERATIONS))}"
            )
        if not isinstance(rates, dict):
            raise FaultConfigError(f"SAGA_FAULTS[{op!r}] must be an object of fault -> rate")
        kwargs: dict[str, Any] = {}
        for fault, value in rates.items():
            where = f"SAGA_FAULTS[{op!r}][{fault!r}]"
            if fault in RATE_FAULTS:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise FaultConfigError(f"{where} must be a number between 0 and 1")
                if not 0.0 <= float(value) <= 1.0:
                    raise FaultConfigError(f"{where} must be between 0 and 1, got {value}")
                kwargs[fault] = float(value)
            elif fault == "latency_ms":
                if (
                    not isinstance(value, list)
                    or len(value) != 2
                    or not all(
                        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                        for v in value
                    )
                    or value[0] > value[1]
                ):
                    raise FaultConfigError(f"{where} must be [min, max] with 0 <= min <= max")
                kwargs[fault] = (float(value[0]), float(value[1]))
            else:
                raise FaultConfigError(
                    f"SAGA_FAULTS[{op!r}]: unknown fault {fault!r}; "
                    "known: error, lost_response, crash, latency_ms"
                )
        specs[op] = FaultSpec(**kwargs)
    return specs


_cache: tuple[str, dict[str, FaultSpec]] | None = None


def active_faults() -> dict[str, FaultSpec]:
    """The parsed faults of this process, re-parsed only if the setting changed."""
    global _cache
    raw = settings.SAGA_FAULTS or ""
    if _cache is None or _cache[0] != raw:
        _cache = (raw, parse_faults(raw))
    return _cache[1]


def load_faults_or_exit() -> None:
    """Called when a worker starts: a malformed value stops it with a clear message, and a
    valid one is said once, as a warning: injected failures otherwise show only in saga
    timelines, and a ``SAGA_FAULTS`` left over from a chaos run looks like a provider outage."""
    try:
        faults = active_faults()
    except FaultConfigError as exc:
        sys.stderr.write(f"sagarunner: refusing to start: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    if faults:
        structlog.get_logger(__name__).warning(
            "worker.faults_injected",
            operations=sorted(faults),
            hint="SAGA_FAULTS is set: these participant calls fail, lose answers or slow down "
            "on purpose; unset it outside fault-injection runs",
        )


F = TypeVar("F", bound=Callable[..., Any])


def fault_point(operation: str) -> Callable[[F], F]:
    """Wrap a participant operation so ``SAGA_FAULTS`` can delay, fail, lose or crash it."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown fault operation {operation!r}")

    provider = operation.split(".", 1)[0]

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if outage.is_down(provider):
                # Counted outside a transactional step's transaction, which this error rolls
                # back: the provider saw the call whatever becomes of the step.
                after_step_transaction(lambda: outage.count_call_while_down(provider))
                raise InjectedError(f"provider {provider} is down (outage) in {operation}")
            if outage.stats_enabled():
                outage.call_started(provider)
                ended = False
                try:
                    return _faulty_call(operation, fn, args, kwargs)
                except InjectedTimeout as exc:
                    if exc.committed:
                        # The start's count was committed with the effect; the end's must
                        # outlive the step's rollback too.
                        after_step_transaction(lambda: outage.call_ended(provider))
                        ended = True
                    raise
                finally:
                    # In a spoiled transaction (a transactional step's, after the participant
                    # raised) no query may run, and none is needed: the start's count rolls
                    # back with it.
                    if not ended and not spoiled():
                        outage.call_ended(provider)
            return _faulty_call(operation, fn, args, kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _faulty_call(operation: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run ``fn`` with the ``SAGA_FAULTS`` of ``operation`` applied."""
    spec = active_faults().get(operation)
    if spec is None:
        return fn(*args, **kwargs)
    if spec.latency_ms is not None:
        time.sleep(random.uniform(*spec.latency_ms) / 1000.0)
    if spec.error and random.random() < spec.error:
        raise InjectedError(f"injected error in {operation}")
    result = fn(*args, **kwargs)
    crash = bool(spec.crash) and random.random() < spec.crash
    lost = not crash and bool(spec.lost_response) and random.random() < spec.lost_response
    committed = False
    if (crash or lost) and in_step_transaction():
        # Inside a transactional step the effect would roll back with the step: these faults
        # promise it took place, so it is committed first (the record is not).
        committed = commit_what_the_step_wrote()
    if crash:
        # The effect is committed; the saga has not recorded it. Die like a SIGKILL.
        os.kill(os.getpid(), signal.SIGKILL)
    if lost:
        exc = InjectedTimeout(f"injected lost response from {operation}")
        exc.committed = committed
        raise exc
    return result
