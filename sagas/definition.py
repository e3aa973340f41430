"""How a saga type is declared: ordered steps, each next to its compensation.

A definition reads top to bottom like the story it tells (Temporal's trip-booking saga, DBOS
workflows). The engine knows nothing about orders: a step is a function of a small
:class:`StepContext` that returns a small JSON-serialisable result, raises
:class:`BusinessFailure` for a definite "no", and raises anything else for "try again".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
class Step:
    """One forward action and, unless it is a pivot or read-only, its compensation.

    A ``pivot`` is the point of no return: once it has run nothing before it is compensated,
    and a cancel request is refused.
    """

    name: str
    action: StepFunction
    compensate: StepFunction | None = None
    pivot: bool = False
    #: Set by :func:`Wait` and :func:`Sleep`: the step parks the saga instead of calling out.
    park: Park | None = None


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
    #: A ``Wait``'s timeout or a ``Sleep``'s duration; ``None``: wait until signalled (the
    #: saga's deadline and cancel requests still apply).
    seconds: float | None = None
    #: What a ``Wait`` does when its timeout passes without the signal.
    on_timeout: str = "compensate"
    #: Whether this saga waits at all (e.g. only orders above a threshold); evaluated when the
    #: saga reaches the step; ``False`` passes the step at once with ``{"skipped": true}``.
    when: Callable[[StepContext], bool] | None = None
    #: ``saga id -> user id`` of the client who may send this signal too (client-facing
    #: signals such as a card holder's confirmation); ``None``: ops staff only.
    client: Callable[[str], Any] | None = None
    #: Checks a payload before it is accepted: returns an error message, or ``None`` if fine.
    validate: Callable[[Mapping[str, JSON]], str | None] | None = None


def _signal_result(ctx: StepContext) -> JSON:
    return {"payload": dict(ctx.signal or {})}


def Wait(  # noqa: N802 - reads like a step in a definition, as in Temporal and Restate
    signal: str,
    *,
    timeout: float | None,
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
    if timeout is not None and timeout < 0:
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


@dataclass(frozen=True)
class SagaDefinition:
    """An ordered list of steps registered under a type name."""

    saga_type: str
    steps: list[Step]
    #: Seconds a saga may run forward before it is timed out; ``None`` means SAGA_DEADLINE.
    deadline: float | None = None
    #: Called inside the transaction that resolves a saga by hand, with the locked saga (its
    #: ``escalated_from`` says whether it stopped undoing or past its pivot). It settles what
    #: must never stay open on a closed saga, such as a stock reservation; raising refuses the
    #: resolve. Must be idempotent (derive keys from the saga, like steps do).
    on_resolve: Callable[[Any], None] | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"saga type {self.saga_type!r} has no steps")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga type {self.saga_type!r} repeats a step name")
        self._index.update({name: i for i, name in enumerate(names)})

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

    @property
    def pivot_index(self) -> int:
        """Index of the first pivot step, or ``len(steps)`` when there is none."""
        for i, step in enumerate(self.steps):
            if step.pivot:
                return i
        return len(self.steps)


_registry: dict[str, SagaDefinition] = {}


def register(definition: SagaDefinition) -> SagaDefinition:
    """Register a saga type by name; re-registering the same name replaces it (test reloads)."""
    _registry[definition.saga_type] = definition
    return definition


def get_definition(saga_type: str) -> SagaDefinition:
    try:
        return _registry[saga_type]
    except KeyError:
        raise LookupError(f"unknown saga type {saga_type!r}; is its module imported?") from None


def registered_types() -> list[str]:
    return sorted(_registry)


def forward_key(saga_id: object, step: str) -> str:
    return f"saga:{saga_id}:{step}"


def undo_key(saga_id: object, step: str) -> str:
    return f"saga:{saga_id}:{step}:undo"
