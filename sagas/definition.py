"""How a saga type is declared: ordered steps, each next to its compensation.

A definition reads top to bottom like the story it tells (Temporal's trip-booking saga, DBOS
workflows). The engine knows nothing about orders: a step is a function of a small
:class:`StepContext` that returns a small JSON-serialisable result, raises
:class:`BusinessFailure` for a definite "no", and raises anything else for "try again".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sagas.models import Saga

JSON = Any


class BusinessFailure(Exception):
    """A definite "no" from a participant (declined, out of stock): never retried.

    ``code`` is machine-readable and becomes the saga's ``failure_code`` (and, for orders, the
    ``cancellation_reason``).
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class ProviderAnswered(Exception):
    """Mix into a participant's transient error that the provider *answered* with: it is up,
    and said "not now" or "this call fails" (a refused refund, a 409 to try again).

    The step is retried like any transient failure, but the provider's breaker counts a
    healthy call: a breaker measures whether a provider answers, and one customer's refund that
    keeps failing must not park every other saga's calls to that provider.
    """


class NothingHappened(Exception):
    """Mix into a participant's transient error raised *before* the call could take effect:
    the provider could not be reached, or refused the call before doing anything.

    The step is retried like any transient failure, but this attempt is not one that may have
    taken effect (a timeout is: the effect may have landed and only the answer been lost). A
    saga that compensates from this step then leaves it alone, unless another attempt of it
    may have taken effect: a cancel during a provider's outage does not wait for the provider
    to undo a call it never took.
    """


@dataclass(frozen=True)
class StepContext:
    """What a step or compensation function gets to work with.

    ``idempotency_key`` is derived, never random: ``saga:{id}:{step}`` for the forward action,
    ``saga:{id}:{step}:undo`` for its compensation, the same on every attempt. A compensation
    also gets ``forward_key`` so it can leave a tombstone that refuses a late forward call.
    """

    saga_id: str
    saga_type: str
    step: str
    attempt: int
    data: Mapping[str, JSON]
    results: Mapping[str, JSON]
    idempotency_key: str
    forward_key: str
    correlation_id: str = ""
    compensating: bool = False
    #: For a ``Wait`` step: the payload of the signal it consumed (``None`` otherwise).
    signal: Mapping[str, JSON] | None = None


StepFunction = Callable[[StepContext], JSON]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a step (or its compensation) is tried again.

    Each field left ``None`` takes today's setting (``SAGA_MAX_ATTEMPTS`` or
    ``SAGA_COMPENSATION_MAX_ATTEMPTS``, ``SAGA_BACKOFF_BASE``, ``SAGA_BACKOFF_MAX``), read when
    used, so a step declares only what makes it different.
    """

    max_attempts: int | None = None
    backoff_base: float | None = None
    backoff_max: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("backoff_base", "backoff_max"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True)
class Step:
    """One forward action and, unless it is a pivot or read-only, its compensation.

    A ``pivot`` is the point of no return: once it has run nothing before it is compensated,
    and a cancel request is refused.

    ``provider`` names the downstream service both functions call (``"payments"``). Its calls
    then go through that provider's circuit breaker and limits: while it is down the saga
    waits, without spending attempts, instead of retrying itself into compensation.

    Policies, each defaulting to the global settings: ``retry`` for the forward action,
    ``compensation_retry`` for its undo, ``timeout`` (seconds, ``SAGA_STEP_TIMEOUT`` when
    ``None``: the step is cut off past it plus ``SAGA_INLINE_BUDGET``; every task's time limits
    and lease fit the longest registered one up to ``SAGA_TASK_TIMEOUT_MAX``, a longer step gets
    a task of its own), and ``non_retryable``:
    exception types that end the step at once like a :class:`BusinessFailure` (the code is the
    exception's ``code`` attribute, else ``step_failed``).

    ``transactional=True`` is for a participant that lives in the engine's own database (on
    Django's default connection) and does nothing outside it: its function and its
    compensation then run inside the transaction that records their outcome, so the effect and
    the record commit together or not at all (one commit per step instead of two). A record
    fenced off by a newer claim rolls the participant's write back with it, and a function
    that raises leaves nothing behind. The idempotency key, tombstones and fencing work as for
    any step. Never for a function that calls out (HTTP, a broker, another database): that
    call cannot be rolled back, and row locks would be held while it waits. Transactional
    steps that follow each other share one transaction and one record (``SAGA_BATCH_STEPS``,
    see :class:`sagas.store.Batch`).

    ``stays_in_database=True`` is for a step that is not transactional but whose functions
    change nothing outside this database either (they write to it through commits of their
    own). Any other such step is taken to call out, so the claim that runs it (or the record
    that goes straight on into it) waits for the disk before it runs
    (:attr:`may_leave_database`); this step's claim need not: each of its writes that waits
    flushes the claim with it (the WAL is one sequence), and one lost with the claim in a
    server crash is made again when the step runs again under its key. Never for a step that
    calls out, even after writing here first.
    """

    name: str
    action: StepFunction
    compensate: StepFunction | None = None
    pivot: bool = False
    transactional: bool = False
    stays_in_database: bool = False
    #: Set by :func:`Wait` and :func:`Sleep`: the step parks the saga instead of calling out.
    park: Park | None = None
    provider: str = ""
    retry: RetryPolicy | None = None
    compensation_retry: RetryPolicy | None = None
    timeout: float | None = None
    non_retryable: tuple[type[BaseException], ...] = ()
    #: Called when a person records that they did this step's undo by hand (the ops "undo
    #: done"), inside that operation's transaction, with the context the compensation gets
    #: (its undo key, the forward key). The compensation never ran, so its participant never
    #: learned of the undo: this is where it records it, so that what a client reads of the
    #: step's effect (an amount voided, a shipment cancelled, stock given back) says it was
    #: undone. It writes only to the database (no call out: row locks are held), must change
    #: nothing when told twice, and raising refuses the operation with the reason, nothing
    #: written. ``None``: the engine's own record (the step undone by hand) is all there is.
    undone_by_hand: StepFunction | None = None

    @property
    def may_leave_database(self) -> bool:
        """Whether running this forward step may do something the engine's database cannot take
        back (a provider's HTTP call): anything but a transactional step, one that
        ``stays_in_database`` or a park (a wait's decision and a timer's action only record).
        The claim that runs such a step, or the record that goes straight on into it, waits for
        the disk before the step runs (``sagas.store``): a claim lost in a server crash would
        take the saga back to before a call that already left, and a cancel then would
        compensate without this step."""
        return not (self.transactional or self.stays_in_database or self.park is not None)

    @property
    def shares_records(self) -> bool:
        """Whether this step may be recorded together with its neighbours of the same kind: a
        step that ``stays_in_database`` (and is not transactional, a park, a pivot or behind a
        provider's breaker). One task that runs such steps back to back writes their records
        as one (``SAGA_BATCH_STEPS``, :class:`sagas.store.Batch`); each step's own writes
        still commit as it makes them, so a run cut short leaves effects with no record of
        them, which the undo then looks for (:meth:`SagaDefinition.run_after`)."""
        return (
            self.stays_in_database
            and not self.transactional
            and self.park is None
            and not self.pivot
            and not self.provider
        )

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"step {self.name!r}: timeout must be positive")
        if self.undone_by_hand is not None and self.compensate is None:
            raise ValueError(
                f"step {self.name!r}: undone_by_hand needs a compensation to stand in for"
            )


ON_TIMEOUT = ("compensate", "escalate")


@dataclass(frozen=True)
class Park:
    """What a parked step waits for: a named signal (``Wait``) or only time (``Sleep``).

    A parked saga holds no worker, lease or connection: its row says which signal it waits for
    and, in ``next_attempt_at``, when its timeout or wake-up is due, so the sweeper fires it
    from the database even if every message was lost.
    """

    #: The signal's name; blank for a ``Sleep``.
    signal: str = ""
    #: A ``Wait``'s timeout or a ``Sleep``'s duration (or a function returning it, read when
    #: the saga parks, e.g. from settings); ``None``: wait until signalled (the saga's deadline
    #: and cancel requests still apply).
    seconds: float | Callable[[], float] | None = None
    #: What a ``Wait`` does when its timeout passes without the signal.
    on_timeout: str = "compensate"
    #: Whether this saga waits at all (e.g. only orders above a threshold); evaluated as the
    #: step before it ends (with that step's result), so ``False`` passes the step by in the same
    #: record with ``{"skipped": true}``; for a first step or a pivot, when the saga reaches it.
    when: Callable[[StepContext], bool] | None = None
    #: ``saga id -> user id`` of the client who may send this signal too (client-facing
    #: signals such as a card holder's confirmation); ``None``: ops staff only.
    client: Callable[[str], Any] | None = None
    #: Checks a payload before it is accepted: returns an error message, or ``None`` if fine.
    validate: Callable[[Mapping[str, JSON]], str | None] | None = None

    @property
    def duration(self) -> float | None:
        """The timeout (or sleep) in seconds, now."""
        return self.seconds() if callable(self.seconds) else self.seconds


def _signal_result(ctx: StepContext) -> JSON:
    return {"payload": dict(ctx.signal or {})}


def Wait(  # noqa: N802 - reads like a step in a definition, as in Temporal and Restate
    signal: str,
    *,
    timeout: float | Callable[[], float] | None,
    on_timeout: str = "compensate",
    name: str | None = None,
    decide: StepFunction | None = None,
    when: Callable[[StepContext], bool] | None = None,
    client: Callable[[str], Any] | None = None,
    validate: Callable[[Mapping[str, JSON]], str | None] | None = None,
    pivot: bool = False,
) -> Step:
    """A step that parks the saga until ``signal`` arrives or ``timeout`` seconds pass.

    Once the signal is there, ``decide`` runs like any step with the payload in
    ``ctx.signal``: it returns the step's result (later steps read it from ``ctx.results``;
    by default ``{"payload": ...}``) or raises :class:`BusinessFailure` to compensate, e.g. a
    rejected review. On timeout the saga compensates (failure code ``timed_out``) or, with
    ``on_timeout="escalate"``, goes to a person (``needs_manual``), who can still send the
    signal to let it go on. A wait has nothing to undo, so it has no compensation.
    """
    if on_timeout not in ON_TIMEOUT:
        raise ValueError(f"on_timeout must be one of {ON_TIMEOUT}, not {on_timeout!r}")
    if isinstance(timeout, int | float) and timeout < 0:
        raise ValueError("timeout must be >= 0 seconds")
    return Step(
        name=name or signal,
        action=decide or _signal_result,
        pivot=pivot,
        park=Park(
            signal=signal,
            seconds=timeout,
            on_timeout=on_timeout,
            when=when,
            client=client,
            validate=validate,
        ),
    )


def _slept(ctx: StepContext) -> JSON:
    return {"slept": True}


def Sleep(seconds: float, *, name: str = "sleep") -> Step:  # noqa: N802 - see Wait
    """A durable timer: the saga parks for ``seconds`` and goes on; survives restarts."""
    if seconds < 0:
        raise ValueError("seconds must be >= 0")
    return Step(name=name, action=_slept, park=Park(seconds=seconds))


class ChangeHook(Protocol):
    """Told about every change of a saga row, inside the transaction that writes it.

    The seam through which a business app keeps its own rows (an outbox of client
    notifications, say) in step with its sagas without the engine knowing about it: whatever
    the hook writes commits or rolls back with the change. ``wants`` is asked first, on every
    record, so it must be cheap (no query); only when it says yes does the engine open a
    transaction around its record and call the hook with the row as it was before and as it is
    after the change. It must read nothing but ``saga.data``: the engine asks it of the saga
    as claimed, and again of a record's row only when ``data`` changed while the step ran
    (``saga_data_flag``), so an answer that followed the state or the step would be missed.
    """

    def wants(self, saga: Saga) -> bool: ...

    def __call__(self, before: Saga, after: Saga) -> None: ...


@dataclass(frozen=True)
class SagaDefinition:
    """An ordered list of steps registered under a type name and a version.

    A saga runs to its end on the definition version it started with: its row stores the
    version and the :attr:`fingerprint` of the definition's shape. Changing the shape (a step
    added, removed, reordered or renamed, the pivot moved, a compensation added or dropped)
    means a new version, registered beside the old one until the old one's sagas have drained
    or been moved with ``saga_migrate``. A shape change without a version bump is caught by
    the fingerprint (``manage.py check`` and every worker refuse it).
    """

    saga_type: str
    steps: list[Step]
    #: Seconds a saga may run forward before it is timed out; ``None`` means SAGA_DEADLINE.
    deadline: float | None = None
    #: Called inside the transaction that resolves a saga by hand, with the locked saga (its
    #: ``escalated_from`` says whether it stopped undoing or going forward, and
    #: ``saga_stopped_before_pivot`` whether forward means before its pivot). It settles what
    #: must never stay open on a closed saga, such as a stock reservation; raising refuses the
    #: resolve. Must be idempotent (derive keys from the saga, like steps do).
    on_resolve: Callable[[Any], None] | None = None
    #: The steps whose effect ``on_resolve`` undoes itself when it is undone by nobody else (an
    #: order's stock reservation): resolving does not leave them in place, so a resolve
    #: neither names them among the effects it keeps nor asks the person to accept them.
    settled_on_resolve: tuple[str, ...] = ()
    #: The definition's version; new sagas start on the highest registered one.
    version: int = 1
    #: Called inside every transaction that changes a saga of this type (see ChangeHook).
    on_change: ChangeHook | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"saga type {self.saga_type!r} has no steps")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"saga type {self.saga_type!r}: version must be an int >= 1")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga type {self.saga_type!r} repeats a step name")
        # A signal is checked (who may send it, its payload) before anyone knows which of the
        # waits for it will take it: waits that share a name must agree on both, or a client
        # could answer a staff-only wait, or a payload pass a check that is not its wait's.
        first: dict[str, Park] = {}
        for step in self.steps:
            park = step.park
            if park is None or not park.signal:
                continue
            seen = first.setdefault(park.signal, park)
            if seen.client != park.client or seen.validate != park.validate:
                raise ValueError(
                    f"saga type {self.saga_type!r}: the waits for signal {park.signal!r} "
                    "differ in who may send it (client) or how its payload is checked "
                    "(validate); give them different signal names"
                )
        unknown = [name for name in self.settled_on_resolve if name not in names]
        if unknown or (self.settled_on_resolve and self.on_resolve is None):
            raise ValueError(
                f"saga type {self.saga_type!r}: settled_on_resolve names steps its on_resolve "
                f"undoes, so it needs an on_resolve and steps of this type (not {unknown})"
            )
        self._index.update({name: i for i, name in enumerate(names)})

    def __str__(self) -> str:
        return f"{self.saga_type} v{self.version}"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def has_step(self, step_name: str) -> bool:
        return step_name in self._index

    def index_of(self, step_name: str) -> int:
        return self._index[step_name]

    def waits_for(self, signal: str) -> list[int]:
        """Indexes of the ``Wait`` steps that take ``signal``."""
        return [
            i for i, s in enumerate(self.steps) if s.park is not None and s.park.signal == signal
        ]

    @property
    def signals(self) -> list[str]:
        """Every signal name this saga type may wait for, in step order."""
        return [s.park.signal for s in self.steps if s.park is not None and s.park.signal]

    def step(self, step_name: str) -> Step:
        return self.steps[self._index[step_name]]

    @property
    def pivot_index(self) -> int:
        """Index of the first pivot step, or ``len(steps)`` when there is none."""
        for i, step in enumerate(self.steps):
            if step.pivot:
                return i
        return len(self.steps)

    def run_after(self, i: int) -> list[int]:
        """Indexes of the steps after step ``i`` that a task may have run with it and recorded
        once (:attr:`Step.shares_records`, steps ``i`` and all of these): empty if step ``i``
        shares no records. A task that stopped before that one record (its worker lost, the
        record fenced off) may have left their effects without a word in the saga's rows."""
        if not self.steps[i].shares_records:
            return []
        later = []
        for j in range(i + 1, len(self.steps)):
            if not self.steps[j].shares_records:
                break
            later.append(j)
        return later

    @property
    def pivot_name(self) -> str | None:
        i = self.pivot_index
        return self.steps[i].name if i < len(self.steps) else None

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the shape a running saga depends on.

        Step names in order, the pivot, and which steps compensate: what decides the next
        step, what a cancel may still stop, and what a compensation undoes. Function bodies
        and policies are not part of it: fixing a bug in a step is not a new shape. Worked
        out once per definition: every claim compares it.
        """
        return shape_fingerprint(
            [(s.name, s.compensate is not None) for s in self.steps], self.pivot_name
        )


def shape_fingerprint(steps: list[tuple[str, bool]], pivot: str | None) -> str:
    """The fingerprint of a shape: ``[(step name, compensates), ...]`` and the pivot's name."""
    shape = {"steps": [[name, bool(comp)] for name, comp in steps], "pivot": pivot}
    raw = json.dumps(shape, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


class UnknownDefinition(LookupError):
    """No definition is registered for a saga type (and version) in this process."""


# saga type -> version -> definition
_registry: dict[str, dict[int, SagaDefinition]] = {}
# Bumped on every change to the registry, so what is worked out from it can be kept until then.
_generation = 0


def register(definition: SagaDefinition) -> SagaDefinition:
    """Register a definition beside the other versions of its type.

    Re-registering the same type and version replaces it (test reloads, a bug fix that keeps
    the shape); the fingerprint check catches a replacement that changed the shape.
    """
    global _generation
    _registry.setdefault(definition.saga_type, {})[definition.version] = definition
    _generation += 1
    return definition


def unregister(saga_type: str, version: int) -> None:
    """Forget one version (tests that play a deploy without it)."""
    global _generation
    versions = _registry.get(saga_type, {})
    versions.pop(version, None)
    if not versions:
        _registry.pop(saga_type, None)
    _generation += 1  # after the change: a reader that saw the old number reads again


def get_definition(saga_type: str, version: int | None = None) -> SagaDefinition:
    """The definition of ``saga_type`` at ``version``; the newest one when ``version`` is None.

    Code that acts on an existing saga passes the saga's own ``definition_version`` (see
    :func:`definition_of`): the newest version may have a different shape.
    """
    versions = _registry.get(saga_type)
    if not versions:
        raise UnknownDefinition(f"unknown saga type {saga_type!r}; is its module imported?")
    if version is None:
        return versions[max(versions)]
    try:
        return versions[version]
    except KeyError:
        raise UnknownDefinition(
            f"saga type {saga_type!r} has no version {version} registered here "
            f"(registered: {', '.join(str(v) for v in sorted(versions))})"
        ) from None


def definition_of(saga: Any) -> SagaDefinition:
    """The definition an existing saga runs on: its type at its own ``definition_version``."""
    return get_definition(saga.saga_type, saga.definition_version)


def type_change_hook(saga: Saga) -> ChangeHook | None:
    """The hook of the saga's type, whether or not it wants this saga's changes."""
    definition = _registry.get(saga.saga_type, {}).get(saga.definition_version)
    return definition.on_change if definition is not None else None


def change_hook(saga: Saga) -> ChangeHook | None:
    """The hook of the saga's type if it wants to hear about this saga's changes, else None."""
    hook = type_change_hook(saga)
    return hook if hook is not None and hook.wants(saga) else None


def definition_problem(saga_type: str, version: int, fingerprint: str = "") -> str:
    """Why this process cannot run a saga recorded with this type, version and fingerprint
    ("" when it can): a worker on this code leaves such a saga untouched."""
    versions = _registry.get(saga_type, {})
    if version not in versions:
        have = ", ".join(f"v{v}" for v in sorted(versions)) or "none"
        return f"this code does not register {saga_type} v{version} (registered: {have})"
    if fingerprint and fingerprint != versions[version].fingerprint:
        return (
            f"{saga_type} v{version} in this code has another shape than the saga started on "
            "(changed without a version bump)"
        )
    return ""


def registered_types() -> list[str]:
    return sorted(_registry)


def registered_versions(saga_type: str) -> list[int]:
    return sorted(_registry.get(saga_type, {}))


def registry_generation() -> int:
    """A number that changes whenever a definition is registered or forgotten."""
    return _generation


def registered_definitions() -> list[SagaDefinition]:
    """Every registered definition, by type and then version."""
    return [_registry[t][v] for t in sorted(_registry) for v in sorted(_registry[t])]


def forward_key(saga_id: object, step: str) -> str:
    return f"saga:{saga_id}:{step}"


def undo_key(saga_id: object, step: str) -> str:
    return f"saga:{saga_id}:{step}:undo"


# ---------------------------------------------------------------------------------------------
# What a definition says about one saga: the context a step gets, the undo ladder
# ---------------------------------------------------------------------------------------------
def step_context(definition: SagaDefinition, saga: Saga, *, compensating: bool) -> StepContext:
    """What the saga's current step (or its compensation) is called with, keys derived from
    the saga and step alone: the runner and a signal's ``when`` probe see the same context."""
    name = saga.current_step
    fwd = forward_key(saga.id, name)
    return StepContext(
        saga_id=str(saga.id),
        saga_type=saga.saga_type,
        step=name,
        attempt=saga.attempt,
        data=saga.data,
        results=saga.results,
        idempotency_key=undo_key(saga.id, name) if compensating else fwd,
        forward_key=fwd,
        correlation_id=saga.correlation_id,
        compensating=compensating,
    )


def next_compensable(
    definition: SagaDefinition,
    saga: Saga,
    below: int,
    undone: Collection[str] = (),
    maybe: Collection[str] = (),
) -> int | None:
    """The next step at an index < ``below`` that took effect (or may have: its row says
    ``maybe_effect``, in ``maybe``), has a compensation and is not in ``undone`` (steps whose
    undo has already run, by the engine or by hand).

    ``saga.results`` keeps a step after its undo, so only the step rows know what is undone.
    Along the definition the saga ran, nothing below the step being undone is undone yet, and a
    saga that starts undoing has undone nothing; but a saga moved to another version while it
    undid, by a ``saga_migrate`` from before it refused such moves, may have an undone step
    below its current one, and would undo it again. So each next rung after an undo is asked
    with the rows read (:func:`sagas.store.ladder_rows`): one query per undo, none on the
    forward path (the first rung, :func:`sagas.runner._start_compensation`, passes none).

    ``maybe`` matters where the undo starts above the step that failed: at a step of a run
    recorded once (:meth:`SagaDefinition.run_after`) that a lost task may have run, whose
    steps between it and the failed one are in no result.
    """
    for j in range(below - 1, -1, -1):
        step = definition.steps[j]
        took = step.name in saga.results or step.name in maybe
        if step.compensate is not None and took and step.name not in undone:
            return j
    return None
