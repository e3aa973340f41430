"""Saga types for the engine tests, whose steps follow a script in the saga's data.

``data["script"]`` maps a step name (or ``"undo:<step>"`` for its compensation) to a list of
outcomes, one per attempt (the last one repeats):

- ``"ok"``: the effect happens and the step returns;
- ``"business:<code>"``: a definite no, nothing happens;
- ``"transient"``: a transient error before anything happens, which the engine cannot tell
  from one after the effect (a plain ``ConnectionError``);
- ``"refused"``: the same error, saying it took no effect (``NothingHappened``);
- ``"lost"``: the effect happens, then the caller gets a timeout;
- ``"crash"``: the effect happens, then the worker process dies (once per step: a marker row
  makes the retry go through);
- ``"stolen"``: the effect happens, then another connection bumps the saga's version, as a
  newer claim would, so the step's record is fenced off;
- ``"stolen_once"``: like ``"stolen"`` the first time the step runs (a marker row, written on
  a connection of its own, remembers it), then ``"ok"``;
- ``"bad_at_commit"``: the first time the step runs (a marker row on a connection of its own
  remembers it), it also writes a row whose foreign key is checked only at COMMIT and points
  nowhere, so the transaction that would record it is refused at COMMIT; then ``"ok"``;
- ``"cancel"``: the effect happens, and a client's cancel request lands meanwhile (on a
  connection of its own, committed at once);
- ``"tuple"``: the effect happens, and the step returns a tuple (JSON gives back a list);
- ``"echo"``: the effect happens, and the step returns ``repr()`` of the results it was given.

Every effect is written to ``test_saga_effects`` keyed by its idempotency key, with a call
count, like a participant that stores its keys: a test reads which effects exist and so can
tell an effect done twice under two keys from one repeated under the same key.
``backend`` is the PostgreSQL backend (``pg_backend_pid()``) of the connection that wrote it
first: which connection a worker's task ran on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from django.conf import settings
from django.db import IntegrityError, connection

from sagas.definition import (
    BusinessFailure,
    NothingHappened,
    RetryPolicy,
    SagaDefinition,
    Sleep,
    Step,
    StepContext,
    Wait,
    register,
)

EFFECTS = "test_saga_effects"
DEFERRED = "test_saga_deferred_refs"


def ensure_effects_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {EFFECTS} (key varchar(200) PRIMARY KEY,"
            " saga_id varchar(64) NOT NULL, step varchar(64) NOT NULL, kind varchar(8) NOT NULL,"
            " calls integer NOT NULL DEFAULT 1, backend integer DEFAULT pg_backend_pid())"
        )
        # A reference checked only at COMMIT, as Django declares its foreign keys.
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {DEFERRED} (id serial PRIMARY KEY, ref varchar(200)"
            f" REFERENCES {EFFECTS} (key) DEFERRABLE INITIALLY DEFERRED)"
        )


def effects(saga_id) -> dict[tuple[str, str], int]:
    """``{(step, "do"|"undo"): calls}`` for one saga."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT step, kind, calls FROM {EFFECTS} WHERE saga_id = %s", [str(saga_id)]
        )
        return {(step, kind): calls for step, kind, calls in cursor.fetchall()}


def backends(saga_ids) -> set[int]:
    """The backends whose connections wrote the effects of these sagas."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT backend FROM {EFFECTS} WHERE saga_id = ANY(%s)",
            [[str(s) for s in saga_ids]],
        )
        return {row[0] for row in cursor.fetchall()}


def _effect(ctx: StepContext, kind: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EFFECTS} (key, saga_id, step, kind) VALUES (%s, %s, %s, %s)"
            f" ON CONFLICT (key) DO UPDATE SET calls = {EFFECTS}.calls + 1",
            [ctx.idempotency_key, ctx.saga_id, ctx.step, kind],
        )


def _crash_once(ctx: StepContext) -> bool:
    """True the first time a step asks to crash (a marker row remembers it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EFFECTS} (key, saga_id, step, kind) VALUES (%s, %s, %s, 'mark')"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            [f"crash:{ctx.idempotency_key}", ctx.saga_id, ctx.step],
        )
        return cursor.fetchone() is not None


class Declined(Exception):
    """A participant's definite no that only some steps declare non-retryable."""

    code = "declined"


def _first_time(saga_id: str, marker: str) -> bool:
    """Write ``marker`` on a connection of its own (committed whatever the step's transaction
    does); True if it was not there yet."""
    raw = connection.get_new_connection(connection.get_connection_params())
    try:
        marked = raw.execute(
            f"INSERT INTO {EFFECTS} (key, saga_id, step, kind) VALUES (%s, %s, '', 'mark')"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            [marker, saga_id],
        ).fetchone()
        raw.commit()
        return marked is not None
    finally:
        raw.close()


def _take_over(saga_id: str, once: str = "") -> None:
    """Bump the saga's version on a connection of its own (committed at once); with ``once``,
    only if no marker row of that key exists yet (and write it)."""
    from sagas.models import Saga

    if once and not _first_time(saga_id, once):
        return
    raw = connection.get_new_connection(connection.get_connection_params())
    try:
        raw.execute(
            f"UPDATE {Saga._meta.db_table} SET version = version + 1 WHERE id = %s", [saga_id]
        )
        raw.commit()
    finally:
        raw.close()


def _cancel_meanwhile(saga_id: str) -> None:
    """A client cancels the saga while this step runs: the real service, on another thread's
    connection, so it commits whatever this step's transaction does."""
    from django.db import connections

    from sagas.exceptions import SagaOperationRefused
    from sagas.services import saga_request_cancel

    def cancel() -> None:
        try:
            saga_request_cancel(saga_id=saga_id, reason="customer_cancelled", actor="test")
        except SagaOperationRefused:
            pass  # already past its pivot, or settled: the test sees the saga run on
        finally:
            connections.close_all()

    thread = threading.Thread(target=cancel)
    thread.start()
    thread.join()


class _Refused(ConnectionError, NothingHappened):
    """A provider that could not be reached: nothing happened."""


def _outcome(ctx: StepContext) -> str:
    name = f"undo:{ctx.step}" if ctx.compensating else ctx.step
    script = ctx.data.get("script", {}).get(name) or ["ok"]
    return script[min(ctx.attempt, len(script)) - 1]


def _run(ctx: StepContext) -> dict:
    outcome = _outcome(ctx)
    kind = "undo" if ctx.compensating else "do"
    if outcome.startswith("business:"):
        raise BusinessFailure(outcome.split(":", 1)[1], f"scripted no at {ctx.step}")
    if outcome == "transient":
        raise ConnectionError(f"scripted transient error at {ctx.step}")
    if outcome == "cancel_transient":  # a client cancels, then this call fails for now
        _cancel_meanwhile(ctx.saga_id)
        raise ConnectionError(f"scripted transient error at {ctx.step}")
    if outcome == "cancel_then_no":  # a client cancels, then this call says a definite no
        _cancel_meanwhile(ctx.saga_id)
        raise BusinessFailure("out_of_stock", f"scripted no at {ctx.step}")
    if outcome == "refused":
        raise _Refused(f"scripted refusal before any effect at {ctx.step}")
    if outcome == "integrity":  # a bad row: the database refuses what the step writes
        raise IntegrityError(f"scripted check constraint violation at {ctx.step}")
    if outcome == "declined":
        raise Declined(f"scripted decline at {ctx.step}")
    if outcome.startswith("slow:"):  # a participant that takes its time, then says yes
        time.sleep(float(outcome.split(":", 1)[1]))
    _effect(ctx, kind)
    if outcome == "lost":
        raise TimeoutError(f"scripted lost response at {ctx.step}")
    if outcome == "crash" and _crash_once(ctx):
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome == "stolen":
        _take_over(ctx.saga_id)
    if outcome == "stolen_once":
        _take_over(ctx.saga_id, once=f"stolen:{ctx.idempotency_key}")
    if outcome == "cancel":
        _cancel_meanwhile(ctx.saga_id)
    if outcome == "bad_at_commit" and _first_time(ctx.saga_id, f"bad:{ctx.idempotency_key}"):
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {DEFERRED} (ref) VALUES ('nowhere')")
    if outcome == "tuple":
        return {"pair": (1, 2)}
    if outcome == "echo":
        return {"seen": repr(ctx.results)}
    return {"step": ctx.step, "attempt": ctx.attempt}


def scripted(
    names: list[str],
    pivot: str | None = None,
    *,
    transactional: bool = False,
    stays_in_database: bool = False,
) -> list[Step]:
    return [
        Step(
            name,
            _run,
            compensate=None if name == pivot else _run,
            pivot=name == pivot,
            transactional=transactional,
            stays_in_database=stays_in_database,
        )
        for name in names
    ]


FIVE = ["s1", "s2", "s3", "s4", "s5"]
register(SagaDefinition("test5", steps=scripted(FIVE)))
# A pivot at s4: s5 runs after the point of no return.
register(SagaDefinition("test_pivot", steps=scripted(FIVE, pivot="s4")))


# -- parked steps (Wait, Sleep) -------------------------------------------------------------
def _decide_go(ctx: StepContext) -> dict:
    """The ``go`` signal's decision: ``{"ok": false}`` is a definite no."""
    payload = dict(ctx.signal or {})
    if payload.get("ok") is False:
        raise BusinessFailure("rejected", "the signal said no")
    return {"payload": payload}


def _go_payload(payload) -> str | None:
    ok = payload.get("ok", True)
    return None if isinstance(ok, bool) else "ok must be true or false"


def _wait_type(
    name: str, timeout: float | Callable[[], float], on_timeout: str = "compensate"
) -> SagaDefinition:
    return SagaDefinition(
        name,
        steps=[
            *scripted(["s1"]),
            Wait(
                "go",
                timeout=timeout,
                on_timeout=on_timeout,
                name="await_go",
                decide=_decide_go,
                validate=_go_payload,
            ),
            *scripted(["s2"]),
        ],
    )


register(_wait_type("test_wait", timeout=120))
register(_wait_type("test_wait_compensate", timeout=1))
# Its timeout read from a setting (TEST_WAIT_SECONDS, 120 unless a test sets it), as the order
# saga's waits read theirs: a test changes it while a saga waits.
register(_wait_type("test_wait_set", timeout=lambda: getattr(settings, "TEST_WAIT_SECONDS", 120)))
register(_wait_type("test_wait_escalate", timeout=1, on_timeout="escalate"))
register(
    SagaDefinition("test_sleep", steps=[*scripted(["s1"]), Sleep(3, name="nap"), *scripted(["s2"])])
)
# Parked steps whose own action follows the script: a timer (a Sleep's built-in action cannot
# fail) and a Wait whose decision can.
_FLAKY_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.05, backoff_max=0.1)


def _flaky_decide(ctx: StepContext) -> dict:
    _run(ctx)
    return {"payload": dict(ctx.signal or {})}


register(
    SagaDefinition(
        "test_sleep_flaky",
        steps=[
            *scripted(["s1"]),
            replace(Sleep(1, name="nap"), action=_run, retry=_FLAKY_RETRY),
            *scripted(["s2"]),
        ],
    )
)
# The same timer at the pivot (it escalates when its action runs out of attempts) and behind
# a provider (its last failure may be held back for the provider's outage).
register(
    SagaDefinition(
        "test_sleep_pivot",
        steps=[
            *scripted(["s1"]),
            replace(
                Sleep(1, name="nap"),
                action=_run,
                pivot=True,
                retry=RetryPolicy(max_attempts=1),
            ),
            *scripted(["s2"]),
        ],
    )
)
register(
    SagaDefinition(
        "test_sleep_provider",
        steps=[
            *scripted(["s1"]),
            replace(
                Sleep(1, name="nap"),
                action=_run,
                provider="card",
                retry=RetryPolicy(max_attempts=1),
            ),
            *scripted(["s2"]),
        ],
    )
)
register(
    SagaDefinition(
        "test_wait_flaky",
        steps=[
            *scripted(["s1"]),
            replace(
                Wait("go", timeout=120, name="await_go", decide=_flaky_decide),
                retry=_FLAKY_RETRY,
            ),
            *scripted(["s2"]),
        ],
    )
)

# -- versions side by side: "ver" v2 inserts a step ("check") after "a". -----------------------
# TEST_SAGA_WITHOUT (comma-separated "type:version") leaves versions out of this process, so a
# test can start a worker that plays a deploy without them (older or newer code).
VER_V1 = ["a", "b", "c"]
VER_V2 = ["a", "check", "b", "c"]
_WITHOUT = {item for item in os.environ.get("TEST_SAGA_WITHOUT", "").split(",") if item}
for _version, _names in ((1, VER_V1), (2, VER_V2)):
    if f"ver:{_version}" not in _WITHOUT:
        register(SagaDefinition("ver", steps=scripted(_names, pivot="c"), version=_version))


# -- moving sagas between versions: "mig" parks at the Wait "go" after "a" took effect. ------
def _go(name: str = "go") -> Wait:
    return Wait("go", timeout=600, name=name, decide=_decide_go, validate=_go_payload)


MIG_V1 = [*scripted(["a"]), _go(), *scripted(["b", "c"], pivot="c")]
# v2: "check" inserted before the wait, "extra" after "b".
MIG_V2 = [*scripted(["a", "check"]), _go(), *scripted(["b", "extra", "c"], pivot="c")]
# v3: "a" lost its compensation and the wait is renamed: v1 sagas at "go" cannot land.
MIG_V3 = [Step("a", _run), _go("approve"), *scripted(["b", "c"], pivot="c")]
for _version, _steps in ((1, MIG_V1), (2, MIG_V2), (3, MIG_V3)):
    register(SagaDefinition("mig", steps=_steps, version=_version))


# -- steps that change places between versions: "swap" parks at the Wait "go" after "a" and at
# the Wait "x" after "b" and "c"; v2 runs "c" before "b", v3 has no "c". "p" is the pivot,
# every other step but the waits has an undo.
def _swap(middle: list[str]) -> list[Step]:
    return [
        *scripted(["a"]),
        Wait("go", timeout=600, decide=_decide_go, validate=_go_payload),
        *scripted(middle),
        Wait("x", timeout=600, decide=_decide_go, validate=_go_payload),
        *scripted(["p"], pivot="p"),
    ]


register(SagaDefinition("swap", steps=_swap(["b", "c"]), version=1))
register(SagaDefinition("swap", steps=_swap(["c", "b"]), version=2))
register(SagaDefinition("swap", steps=_swap(["b"]), version=3))


# -- a step behind a provider's breaker -----------------------------------------------------
def _behind(steps: list[Step], provider: str, names: set[str]) -> list[Step]:
    from dataclasses import replace

    return [replace(s, provider=provider) if s.name in names else s for s in steps]


register(
    SagaDefinition("test_provider", steps=_behind(scripted(["s1", "s2", "s3"]), "card", {"s2"}))
)


def _card_slots_leased(ctx: StepContext) -> dict:
    """What a step right after a transactional call to ``card`` sees of its call slots."""
    from providers.models import CallSlot

    return {"leased": CallSlot.objects.filter(provider="card", lease_until__isnull=False).count()}


# A transactional step behind the breaker, then a step that asks the gate for nothing.
register(
    SagaDefinition(
        "test_tx_provider",
        steps=[
            Step("a", _run, compensate=_run, transactional=True, provider="card"),
            Step("b", _card_slots_leased),
        ],
    )
)
# The same with s2 the pivot.
register(
    SagaDefinition(
        "test_provider_pivot",
        steps=_behind(scripted(["s1", "s2", "s3"], pivot="s2"), "card", {"s2"}),
    )
)


# -- per-step policies: "picky" retries twice and takes Declined as final, "slow" has 8 s. ---
POLICY = [
    Step("quick", _run, compensate=_run),
    Step(
        "picky",
        _run,
        compensate=_run,
        retry=RetryPolicy(max_attempts=2, backoff_base=0.01),
        compensation_retry=RetryPolicy(max_attempts=2, backoff_base=0.01),
        non_retryable=(Declined,),
    ),
    Step("slow", _run, compensate=_run, timeout=8),
]
register(SagaDefinition("policy", steps=POLICY))

# The same five steps as transactional steps: each effect commits with the step's record.
register(SagaDefinition("test_tx", steps=scripted(FIVE, transactional=True)))
# The same five steps declared to stay in this database: each effect commits on its own, and a
# task that runs them back to back records them once.
register(SagaDefinition("test_plain", steps=scripted(FIVE, stays_in_database=True)))


class _FlaggedOnly:
    """A change hook that wants only sagas whose data says ``hooked`` (none of the tests')."""

    def wants(self, saga) -> bool:
        return bool(saga.data.get("hooked"))

    def __call__(self, before, after) -> None:
        return None


# The same with a change hook on its type: a plain run's one record would be guarded on the
# saga's data, so its steps are recorded one by one.
register(
    SagaDefinition(
        "test_plain_hooked",
        steps=scripted(FIVE, stays_in_database=True),
        on_change=_FlaggedOnly(),
    )
)
# Its run of three recorded once in v1; v2 puts "x", a step that shares no records, after "a".
register(
    SagaDefinition("plainmig", steps=scripted(["a", "b", "c"], stays_in_database=True), version=1)
)
register(
    SagaDefinition(
        "plainmig",
        steps=[
            *scripted(["a"], stays_in_database=True),
            *scripted(["x"]),
            *scripted(["b", "c"], stays_in_database=True),
        ],
        version=2,
    )
)
# A step that may leave the database (b) between two that may not (a transactional one and
# one that only writes here on its own commits): which commits wait.
register(
    SagaDefinition(
        "test_mixed",
        steps=[
            Step("a", _run, compensate=_run, transactional=True),
            Step("b", _run, compensate=_run),
            Step("c", _run, compensate=_run, stays_in_database=True),
        ],
    )
)

# -- a step longer than a task's default time limits, after the pivot: "fits" has the default
# timeout, "long" 8 s and one attempt, so a failure of its escalates to a person (needs_manual).
register(
    SagaDefinition(
        "handback",
        steps=[
            Step("fits", _run, compensate=_run),
            Step("long", _run, pivot=True, timeout=8, retry=RetryPolicy(max_attempts=1)),
        ],
    )
)


# -- a step longer than the default timeout but within SAGA_TASK_TIMEOUT_MAX (6 s in the
# tests): every task's limits fit it, so it runs inline between two default steps.
register(
    SagaDefinition(
        "midlong",
        steps=[
            Step("before", _run, compensate=_run),
            Step("booking", _run, compensate=_run, timeout=5),
            Step("after", _run, compensate=_run),
        ],
    )
)


# -- which task messages a worker ran for a saga ---------------------------------------------
# A worker started with SAGA_TEST_RECORD_DELIVERIES=1 writes one row per ``sagas.run`` task it
# starts: the saga, the version the doorbell named, and the soft time limit the message
# carried (NULL: none, i.e. the task's default limits). Tests count task messages with it.
DELIVERIES = "test_saga_deliveries"
RECORD_DELIVERIES = "SAGA_TEST_RECORD_DELIVERIES"


def ensure_deliveries_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {DELIVERIES} (id bigserial PRIMARY KEY,"
            " saga_id varchar(64) NOT NULL, version integer NOT NULL, soft_limit float)"
        )


def deliveries(saga_id) -> list[tuple[int, float | None]]:
    """``[(version, soft time limit or None), ...]`` of the saga's task messages, in order."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT version, soft_limit FROM {DELIVERIES} WHERE saga_id = %s ORDER BY id",
            [str(saga_id)],
        )
        return [(version, soft) for version, soft in cursor.fetchall()]


def _record_delivery(sender=None, task=None, args=None, **_kwargs) -> None:
    if task is None or task.name != "sagas.run" or not args:
        return
    soft = (task.request.timelimit or (None, None))[1]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {DELIVERIES} (saga_id, version, soft_limit) VALUES (%s, %s, %s)",
            [str(args[0]), int(args[1]), None if soft is None else float(soft)],
        )


if os.environ.get(RECORD_DELIVERIES) == "1":
    from celery.signals import task_prerun

    task_prerun.connect(_record_delivery, weak=False)
