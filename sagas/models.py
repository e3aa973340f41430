"""The saga's whole state lives in these rows; a Celery message is only a doorbell.

``Saga.state`` is a protected django-fsm field: transitions are declared once here, and the
engine applies them to an in-memory copy before writing the row with a version-fenced UPDATE,
so a stale or duplicate task delivery can never move a saga.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django_fsm import FSMField, FSMModelMixin, transition


class SagaState(models.TextChoices):
    RUNNING = "running", "running"
    COMPENSATING = "compensating", "compensating"
    SUCCEEDED = "succeeded", "succeeded"
    COMPENSATED = "compensated", "compensated"
    NEEDS_MANUAL = "needs_manual", "needs manual"
    RESOLVED = "resolved", "resolved"


ACTIVE_STATES = (SagaState.RUNNING, SagaState.COMPENSATING)
TERMINAL_STATES = (SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.RESOLVED)
SETTLED_STATES = (*TERMINAL_STATES, SagaState.NEEDS_MANUAL)

#: Each state as a sentence says it after "The saga": a state's name is no adjective ("The
#: saga is succeeded; there is nothing to retry." was what an operator read).
_STATE_SAID = {
    SagaState.RUNNING: "is running",
    SagaState.COMPENSATING: "is compensating",
    SagaState.SUCCEEDED: "has succeeded",
    SagaState.COMPENSATED: "has been compensated",
    SagaState.NEEDS_MANUAL: "needs a person (needs_manual)",
    SagaState.RESOLVED: "has been resolved",
}


def state_said(state: str, at: str = "") -> str:
    """What follows "The saga" (or "it") in a sentence saying the saga's ``state``: "has
    succeeded", "needs a person (needs_manual)". ``at``, its current step, is named only for a
    saga not finished, where it says where the saga stands ("is compensating at s1")."""
    said = _STATE_SAID.get(state, f"is {state}")  # type: ignore[call-overload]
    if at and state not in TERMINAL_STATES:
        said += f" at {at}"
    return said


class Saga(FSMModelMixin, models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    saga_type = models.CharField(max_length=64)
    state = FSMField(default=SagaState.RUNNING, choices=SagaState.choices, protected=True)
    #: The definition version of its type the saga runs on (it started on the newest then;
    #: ``saga_migrate`` may move it), and the fingerprint of that definition's shape when it
    #: started or moved ("" for sagas recorded before fingerprints existed).
    definition_version = models.PositiveIntegerField(default=1)
    definition_fingerprint = models.CharField(max_length=32, blank=True, default="")
    #: The step being run forward, or compensated while compensating, by NAME: the engine
    #: addresses steps by name. ``step_index`` is its position in the saga's own definition
    #: version, kept beside it for ordering and SQL filters.
    current_step = models.CharField(max_length=64)
    step_index = models.PositiveSmallIntegerField(default=0)
    #: Fencing token: every claim and every record bumps it; a message carries the one it
    #: expects, so stale or duplicate deliveries find no row to update.
    version = models.PositiveBigIntegerField(default=0)
    #: Attempts (claims) of the current step or compensation.
    attempt = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    #: Doorbells the sweeper rang since the saga was last claimed. Each re-ring waits twice as
    #: long, so a backlogged queue is not flooded with duplicates of doorbells still waiting in it.
    sweeps = models.PositiveSmallIntegerField(default=0)
    deadline_at = models.DateTimeField(null=True, blank=True)
    #: A cancel requested by a client, an operator or the deadline; honoured at the next step
    #: boundary as long as the pivot has not run.
    cancel_reason = models.CharField(max_length=64, blank=True, default="")
    #: Why the saga compensates (business code, ``step_failed``, ``timed_out``, ...).
    failure_code = models.CharField(max_length=64, blank=True, default="")
    #: The forward step that failed (with ``failure_code``, the saga's failure signature).
    failed_step = models.CharField(max_length=64, blank=True, default="")
    #: The step whose compensation (undo) kept failing, a separate fact from the forward
    #: failure: a saga that failed at ``arrange_shipment`` may then fail to undo
    #: ``authorize_payment``, and both are worth filtering on.
    failed_undo = models.CharField(max_length=64, blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    #: The state a saga was in when it escalated to ``needs_manual``; ``retry_now`` returns there.
    escalated_from = models.CharField(max_length=16, blank=True, default="")
    #: Input of the saga: ids, amounts and codes, never personal data or tokens.
    #: The provider whose breaker or limits this saga waits for ("" when not waiting).
    parked_on = models.CharField(max_length=64, blank=True, default="")
    data = models.JSONField(default=dict, blank=True)
    #: Results of the forward steps that took effect, by step name; later steps read them.
    results = models.JSONField(default=dict, blank=True)
    correlation_id = models.CharField(max_length=128, blank=True, default="")
    #: The signal a parked saga waits for (a ``Wait`` step); blank when not waiting for one.
    waiting_for = models.CharField(max_length=64, blank=True, default="")
    #: When the saga parked at its current ``Wait`` or ``Sleep`` step; null when not parked.
    #: A parked saga holds no lease: its ``next_attempt_at`` is the timeout or wake-up time.
    waiting_since = models.DateTimeField(null=True, blank=True)
    #: W3C trace context (``traceparent``, ``tracestate``) of the request that started the
    #: saga: every task, step, signal and delivery of the saga continues that trace.
    trace_context = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("operate_saga", "Can operate sagas (retry now, compensate, resolve)")]
        indexes = [
            # The sweeper: overdue active sagas. Small, because settled sagas leave it.
            models.Index(
                fields=["next_attempt_at"],
                name="saga_due_active_idx",
                condition=Q(state__in=["running", "compensating"]),
            ),
            # The pumps (sagas.store.claim_due): due sagas no task holds, oldest first. Rows
            # leave it as soon as a task takes them, so a pump never scans past running work.
            models.Index(
                fields=["next_attempt_at"],
                name="saga_due_free_idx",
                condition=Q(state__in=["running", "compensating"], lease_until__isnull=True),
            ),
            # The sweeper's deadline pass: running sagas with no cancel requested yet.
            models.Index(
                fields=["deadline_at"],
                name="saga_deadline_running_idx",
                condition=Q(state="running", cancel_reason=""),
            ),
            models.Index(fields=["state", "-created_at"], name="saga_state_created_idx"),
            models.Index(fields=["saga_type", "-created_at"], name="saga_type_created_idx"),
            models.Index(fields=["-created_at"], name="saga_created_idx"),
            models.Index(
                fields=["failed_step", "failure_code", "-created_at"],
                name="saga_failure_sig_idx",
                condition=~Q(failed_step=""),
            ),
            # The ops console: the failures of the last day (dashboard, signature filter) and
            # the newest sagas failed at a step (list filter), read from failed sagas only.
            models.Index(
                fields=["-created_at", "failed_step", "failure_code"],
                name="saga_failed_created_idx",
                condition=~Q(failed_step=""),
            ),
            # The ops console: parked sagas by the signal they wait for, oldest first.
            models.Index(
                fields=["waiting_for", "waiting_since"],
                name="saga_waiting_idx",
                condition=Q(waiting_since__isnull=False),
            ),
            # Active sagas per type and definition version: the deploy check and the dashboard.
            models.Index(
                fields=["saga_type", "definition_version", "definition_fingerprint"],
                name="saga_active_version_idx",
                condition=Q(state__in=["running", "compensating", "needs_manual"]),
            ),
            # The "failed undo" filter: sagas whose undo kept failing, few of them.
            models.Index(
                fields=["failed_undo", "-created_at"],
                name="saga_failed_undo_idx",
                condition=~Q(failed_undo=""),
            ),
            models.Index(
                fields=["correlation_id"],
                name="saga_correlation_idx",
                condition=~Q(correlation_id=""),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.saga_type} saga {self.id} ({self.state})"

    # -- transitions: declared once; the engine calls them on an in-memory copy and then writes
    #    the row fenced on its version (see sagas.store).
    @transition(field=state, source=SagaState.RUNNING, target=SagaState.SUCCEEDED)
    def succeed(self) -> None:
        """Every forward step has run."""

    @transition(field=state, source=SagaState.RUNNING, target=SagaState.COMPENSATING)
    def begin_compensation(self) -> None:
        """A business failure, exhausted retries, a cancel or the deadline."""

    @transition(field=state, source=SagaState.COMPENSATING, target=SagaState.COMPENSATED)
    def finish_compensation(self) -> None:
        """Every step that took effect (or may have) has been undone."""

    @transition(
        field=state,
        source=[SagaState.RUNNING, SagaState.COMPENSATING],
        target=SagaState.NEEDS_MANUAL,
    )
    def escalate(self) -> None:
        """A compensation, or a step past the pivot, still fails after its retries."""

    @transition(
        field=state,
        source=SagaState.NEEDS_MANUAL,
        target=SagaState.COMPENSATING,
        # django-fsm types a condition's argument as any Model, not the model it guards.
        conditions=[lambda saga: saga.escalated_from == SagaState.COMPENSATING],  # type: ignore[attr-defined]
    )
    def resume_compensation(self) -> None:
        """An operator's retry: the ladder goes on where it stopped."""

    @transition(
        field=state,
        source=SagaState.NEEDS_MANUAL,
        target=SagaState.RUNNING,
        conditions=[lambda saga: saga.escalated_from == SagaState.RUNNING],  # type: ignore[attr-defined]
    )
    def resume_forward(self) -> None:
        """A person lets it go on: retry now, the signal a timed-out wait waited for, or a
        cancel of a saga that stopped before its pivot (see ``sagas.services``)."""

    @transition(field=state, source=SagaState.NEEDS_MANUAL, target=SagaState.RESOLVED)
    def resolve(self) -> None:
        """A person closed it by hand, with a note."""

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES


class StepStatus(models.TextChoices):
    PENDING = "pending", "pending"
    RETRYING = "retrying", "retrying"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    COMPENSATING = "compensating", "compensating"
    COMPENSATED = "compensated", "compensated"
    COMPENSATION_FAILED = "compensation_failed", "compensation failed"
    #: A ``Wait`` or ``Sleep`` step the saga is parked at.
    WAITING = "waiting", "waiting"
    #: A person did the undo outside the system and said so (``saga_undo_done``).
    COMPENSATED_BY_HAND = "compensated_by_hand", "undone by hand"


#: The statuses of a step whose undo has run, by the engine or by a person.
UNDONE_STATUSES = (StepStatus.COMPENSATED, StepStatus.COMPENSATED_BY_HAND)


class SagaStep(models.Model):
    """One step of one saga, addressed by its name; ``index`` is only its display position
    (in the saga's definition version; ``saga_migrate`` renumbers it)."""

    # Indexed by saga_step_unique_name (saga, name), which starts with it.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="steps", db_index=False)
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=64)
    status = models.CharField(max_length=24, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    idempotency_key = models.CharField(max_length=200)
    result = models.JSONField(null=True, blank=True)
    #: The forward action definitely took effect (it returned a result).
    took_effect = models.BooleanField(default=False)
    #: An attempt ended without a definite answer (timeout, crash): it may have taken effect.
    maybe_effect = models.BooleanField(default=False)
    compensation_attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(null=True, blank=True)
    #: A ``Wait``'s timeout (a ``Sleep``'s length) in seconds, fixed when the saga parked here:
    #: it decides when the wait ends and how far it moved the deadline, so a timeout setting
    #: changed (or a saga moved to another version) while sagas wait changes neither. On the
    #: step's row, not the saga's, so it can never be read for another wait. Null: no timeout,
    #: or parked by a release that did not keep it (the step's own timeout then applies).
    wait_seconds = models.FloatField(null=True, blank=True)
    #: The provider breaker's generation in which this step's failed last attempt was last
    #: held back while the breaker was closed (``providers.breaker.held_back``), and how many
    #: times in it: a bounded number per generation, so a provider failing below its
    #: breaker's threshold does not keep a saga calling it, while one that closed and fails
    #: again (a flap) may hold it back again. ``held_times`` null: never held back (or held
    #: once, by a worker of the release before the column, if ``held_generation`` is set); not
    #: a default, so that release's workers can still insert step rows without it.
    held_generation = models.PositiveBigIntegerField(null=True, blank=True)
    held_times = models.PositiveSmallIntegerField(null=True, blank=True)

    # Not fields: the saga's page in the ops console sets them on the steps it shows.
    compensation: str = ""  # the name of the step's undo, "-" for none
    how_it_ended: str = ""  # the last error in words

    class Meta:
        ordering = ["saga", "index"]
        constraints = [
            models.UniqueConstraint(fields=["saga", "name"], name="saga_step_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class SagaEvent(models.Model):
    """One line of a saga's timeline: attempts, retries, compensations, ops actions."""

    id = models.BigAutoField(primary_key=True)
    #: No database constraint: every event is written with its saga's row, in the statement
    #: that writes or creates that row (the engine's starts and records) or in a transaction
    #: that holds it locked (operations, signals, ``saga_migrate``), so it cannot name a
    #: missing saga; and the constraint's check locked that row once more for every event
    #: (``FOR KEY SHARE``: a WAL record and a dirtied page, on the hottest row there is).
    #: Django still deletes a saga's events with it.
    saga = models.ForeignKey(
        Saga, on_delete=models.CASCADE, related_name="events", db_index=False, db_constraint=False
    )
    at = models.DateTimeField()
    kind = models.CharField(max_length=40)
    step = models.CharField(max_length=64, blank=True, default="")
    attempt = models.PositiveIntegerField(default=0)
    detail = models.TextField(blank=True, default="")
    actor = models.CharField(max_length=150, blank=True, default="engine")
    duration_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["saga", "id"]
        indexes = [models.Index(fields=["saga", "id"], name="saga_event_timeline_idx")]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.kind} {self.step}"


class SagaSignal(models.Model):
    """A signal sent to a saga (a fraud analyst's decision, a card holder's confirmation).

    Kept here, not in a message: a signal that arrives before the saga reaches its ``Wait``
    waits in this table and is consumed when the saga gets there. ``(saga, name, key)`` is
    unique, so a repeated delivery with the same idempotency key is a replay, not a second
    signal. ``consumed_at`` is written in the same transaction as the record of the ``Wait``
    step that took the signal's payload as its result.
    """

    id = models.BigAutoField(primary_key=True)
    # Indexed by saga_signal_unique_key (saga, name, key), which starts with it.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="signals", db_index=False)
    name = models.CharField(max_length=64)
    key = models.CharField(max_length=255)
    payload = models.JSONField(default=dict, blank=True)
    #: Who sent it, as in the timeline (``user:<name>``).
    actor = models.CharField(max_length=150, blank=True, default="")
    received_at = models.DateTimeField()
    consumed_at = models.DateTimeField(null=True, blank=True)
    #: The step that consumed it.
    consumed_by = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["saga", "id"]
        constraints = [
            models.UniqueConstraint(fields=["saga", "name", "key"], name="saga_signal_unique_key"),
        ]
        indexes = [
            models.Index(
                fields=["saga", "name", "id"],
                name="saga_signal_pending_idx",
                condition=Q(consumed_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"signal {self.name} ({self.key}) for saga {self.saga_id}"
