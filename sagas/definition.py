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


@dataclass(frozen=True)
class SagaDefinition:
    """An ordered list of steps registered under a type name."""

    saga_type: str
    steps: list[Step]
    #: Seconds a saga may run forward before it is timed out; ``None`` means SAGA_DEADLINE.
    deadline: float | None = None
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
