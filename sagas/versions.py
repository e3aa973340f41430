"""Moving unfinished sagas from one definition version of their type to another.

The same habit as the compensation plan: first the plan (what would move, from which step to
which, which steps each group skips or gains, which step rows the move removes and what each
records, what cannot move and why), then ``apply``. Every decision is by step NAME: a saga
lands on the step of the same name in the target version.

A saga moves only if the move cannot make it do something wrong:

- its current step exists in the target (a parked saga's step parks on the same signal);
- the steps that took effect are the same ones before its current step in both versions, so
  it neither runs one again nor loses track of one;
- while it may still compensate, each of those steps exists in the target with a
  compensation, so an undo is never dropped;
- while it may still compensate, the steps it has reached (run, undone, or its current one)
  also come in the same order in both versions, and none it has undone comes below its
  current step in the target: the undo ladder walks the saga's definition from its current
  step down, so it would otherwise undo out of order (not newest first) or undo a step twice;
- every step it has undone (by the engine or by hand) exists in the target: its row is the
  record of that undo (a by-hand one is what says a person vouched for it), and the move keeps
  only the rows of the target's steps;
- while it may still go forward, no step after its current one in the source comes before it
  in the target: the saga goes on from its current step, so that step would never run;
- it does not cross a pivot: a saga that reached the pivot stays past the same pivot, and one
  before it does not land past the target's pivot (it would skip the point of no return);
- no step is in flight: a saga whose lease is held is left for a later run.

``apply`` moves sagas in batches, each row locked (``SKIP LOCKED``: a row another transaction
holds is passed by and counted, so the operator is told to run it again) and written with an
UPDATE fenced on its version, definition version and an expired lease, and bumps ``version``
so a doorbell queued for the old shape is stale; each moved saga gets a timeline event naming
the actor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from sagas.definition import SagaDefinition, forward_key, get_definition, registered_types
from sagas.doorbell import ring_on_commit
from sagas.models import UNDONE_STATUSES, Saga, SagaEvent, SagaState, SagaStep, StepStatus
from sagas.services import audit_ops_events
from sagas.store import mark_maybe_effect, run_suspects
from sagas.waits import SKIPPED

UNSETTLED = (SagaState.RUNNING, SagaState.COMPENSATING, SagaState.NEEDS_MANUAL)
_FIELDS = (
    "id",
    "state",
    "escalated_from",
    "current_step",
    "definition_fingerprint",
    "results",
    "lease_until",
    "waiting_since",
    "version",
    "next_attempt_at",
    "attempt",
)


class MigrationRefused(Exception):
    """The move as asked makes no sense (unknown versions, the same version, ...)."""


@dataclass(frozen=True)
class Verdict:
    """What happens to one saga: where it lands, or why it cannot move."""

    group: tuple[str, str]  # (state, current step)
    lands_at: str = ""
    skips: tuple[str, ...] = ()
    gains: tuple[str, ...] = ()
    #: Every step row the move removes (the target lacks its step), each with what it
    #: records: ``confirm_3ds (skipped)``, ``fraud_review (not reached)``.
    drops: tuple[str, ...] = ()
    refused: str = ""
    in_flight: bool = False


@dataclass
class Plan:
    saga_type: str
    source: SagaDefinition
    target: SagaDefinition
    moves: Counter = field(default_factory=Counter)  # (state, step, lands, skips, gains, drops)
    refused: Counter = field(default_factory=Counter)  # (state, step, reason)
    in_flight: Counter = field(default_factory=Counter)  # (state, step)
    moved: int = 0
    #: Sagas ``apply`` passed by unread because another transaction held their row locked.
    held: int = 0

    @property
    def movable(self) -> int:
        return sum(self.moves.values())

    @property
    def blocked(self) -> int:
        return sum(self.refused.values())

    def add(self, verdict: Verdict) -> None:
        state, step = verdict.group
        if verdict.refused:
            self.refused[(state, step, verdict.refused)] += 1
        elif verdict.in_flight:
            self.in_flight[(state, step)] += 1
        else:
            key = (state, step, verdict.lands_at, verdict.skips, verdict.gains, verdict.drops)
            self.moves[key] += 1


def _definitions(saga_type: str, from_version: int, to_version: int) -> tuple[SagaDefinition, ...]:
    if from_version == to_version:
        raise MigrationRefused(f"--from and --to are both {from_version}: nothing to move.")
    if saga_type not in registered_types():
        raise MigrationRefused(
            f"No saga type {saga_type!r} is registered here (registered: "
            f"{', '.join(registered_types()) or 'none'}); is its module in "
            "SAGA_DEFINITION_MODULES?"
        )
    try:
        return get_definition(saga_type, from_version), get_definition(saga_type, to_version)
    except LookupError as exc:
        raise MigrationRefused(
            f"{exc}. Both versions must be registered in the code that moves the sagas."
        ) from None


def _may_compensate(source: SagaDefinition, saga: dict[str, Any]) -> bool:
    state, escalated = saga["state"], saga["escalated_from"]
    if state == SagaState.COMPENSATING or (
        state == SagaState.NEEDS_MANUAL and escalated == SagaState.COMPENSATING
    ):
        return True
    return source.index_of(saga["current_step"]) < source.pivot_index


def _may_go_forward(saga: dict[str, Any]) -> bool:
    """Running, or stopped for a person while running (a retry sends it on)."""
    state, escalated = saga["state"], saga["escalated_from"]
    return state == SagaState.RUNNING or (
        state == SagaState.NEEDS_MANUAL and escalated == SagaState.RUNNING
    )


def assess(
    source: SagaDefinition,
    target: SagaDefinition,
    saga: dict[str, Any],
    effects: set[str],
    *,
    now: datetime,
    undone: set[str] | frozenset[str] = frozenset(),
    removed: Mapping[str, tuple[str, bool]] | None = None,
) -> Verdict:
    """The verdict for one saga (a dict of :data:`_FIELDS`) whose steps in ``effects`` took
    effect (or may have) and are not undone yet, and whose steps in ``undone`` are undone.

    ``removed`` holds its step rows that a move would delete (their step is not in the
    target), as ``name -> (status, skipped)``: the plan names each, wherever it stands, so the
    operator is not told only of the steps after the current one.
    """
    cur = saga["current_step"]
    group = (str(saga["state"]), cur)
    fingerprint = saga["definition_fingerprint"]
    if fingerprint and fingerprint != source.fingerprint:
        return Verdict(group, refused=f"started on another shape of v{source.version}")
    if not source.has_step(cur):
        return Verdict(group, refused=f"its current step {cur} is not in v{source.version}")
    if not target.has_step(cur):
        return Verdict(group, refused=f"its current step {cur} does not exist in v{target.version}")
    effects = {n for n in effects if source.has_step(n)}
    src_at, tgt_at = source.index_of(cur), target.index_of(cur)
    src_step, tgt_step = source.step(cur), target.step(cur)
    if saga["waiting_since"] is not None:
        src_signal = src_step.park.signal if src_step.park else None
        tgt_signal = tgt_step.park.signal if tgt_step.park else None
        if src_signal != tgt_signal:
            return Verdict(
                group,
                refused=f"it waits at {cur}, which does not wait the same way in v{target.version}",
            )
    kept = {n for n in effects if target.has_step(n)}
    if {n for n in kept if n != cur and source.index_of(n) < src_at} != {
        n for n in kept if n != cur and target.index_of(n) < tgt_at
    }:
        return Verdict(
            group,
            refused=f"the steps that took effect are not all before {cur} in v{target.version}",
        )
    gone = sorted(
        (n for n in undone if source.has_step(n) and not target.has_step(n)), key=source.index_of
    )
    if gone:
        one = len(gone) == 1
        return Verdict(
            group,
            refused=f"{', '.join(gone)} {'is' if one else 'are'} undone already and "
            f"{'does' if one else 'do'} not exist in v{target.version} (the record of "
            f"{'its undo' if one else 'their undos'} would be lost)",
        )
    if _may_go_forward(saga):
        behind = [
            n
            for n in source.names[src_at + 1 :]
            if target.has_step(n) and target.index_of(n) < tgt_at
        ]
        if behind:
            one = len(behind) == 1
            return Verdict(
                group,
                refused=f"{', '.join(behind)} {'comes' if one else 'come'} after {cur} in "
                f"v{source.version} and before it in v{target.version} "
                f"({'it' if one else 'they'} would never run)",
            )
    if _may_compensate(source, saga):
        out_of_order = _ladder_order(source, target, saga, effects, undone)
        if out_of_order:
            return Verdict(group, refused=out_of_order)
        # Everything not undone yet that has an undo must keep one.
        undoable = sorted(n for n in effects if source.step(n).compensate is not None)
        missing = [n for n in undoable if not target.has_step(n)]
        if missing:
            return Verdict(
                group,
                refused=f"{', '.join(missing)} took effect and does not exist in "
                f"v{target.version} (its undo would be lost)",
            )
        lost = [n for n in undoable if target.step(n).compensate is None]
        if lost:
            return Verdict(
                group,
                refused=f"{', '.join(lost)} took effect and has no compensation in "
                f"v{target.version}",
            )
    if src_at >= source.pivot_index:
        if source.pivot_name != target.pivot_name or tgt_at < target.pivot_index:
            return Verdict(
                group,
                refused=f"it has reached the pivot {source.pivot_name} and v{target.version}'s "
                f"pivot is {target.pivot_name or 'none'}",
            )
    elif tgt_at > target.pivot_index:
        return Verdict(
            group, refused=f"it would skip v{target.version}'s pivot {target.pivot_name}"
        )
    lease = saga["lease_until"]
    if lease is not None and lease > now:
        return Verdict(group, in_flight=True)
    src_names = set(source.names)
    skips = tuple(n for n in target.names[:tgt_at] if n not in src_names)
    gains = tuple(n for n in target.names[tgt_at + 1 :] if n not in src_names)
    drops = _drops(source, src_at, removed or {})
    if saga["state"] != SagaState.RUNNING:
        # Not going forward (undoing, or waiting for a person): nothing is skipped or gained
        # unless a person sends it forward again.
        skips = gains = ()
    return Verdict(group, lands_at=cur, skips=skips, gains=gains, drops=drops)


def _ladder_order(
    source: SagaDefinition,
    target: SagaDefinition,
    saga: dict[str, Any],
    effects: set[str],
    undone: set[str] | frozenset[str],
) -> str:
    """Why the target would undo this saga's steps in another order than the source, or "".

    The ladder takes its order from the saga's definition, not from what ran: after a move it
    walks the target from the current step down, passing by only steps it has not run. So a
    step undone already that the target puts below the current one would be met again (and
    the dry run, which passes undone steps by, would not say so); and two steps the saga has
    reached that the target swaps would be undone oldest first. Steps only one version has
    are the other checks' business.
    """
    cur, version = saga["current_step"], target.version
    both = {n for n in undone if source.has_step(n) and target.has_step(n)}
    below = sorted(
        (n for n in both if target.index_of(n) < target.index_of(cur)), key=target.index_of
    )
    if below:
        names = ", ".join(below)
        if len(below) == 1:
            return (
                f"{names} is undone already and comes before {cur} in v{version} "
                "(its undo would run again)"
            )
        return (
            f"{names} are undone already and come before {cur} in v{version} "
            "(their undos would run again)"
        )
    reached = {cur, *effects, *undone, *(saga["results"] or {})}
    order = sorted(
        (n for n in reached if source.has_step(n) and target.has_step(n)), key=source.index_of
    )
    for first, then in zip(order, order[1:], strict=False):
        if target.index_of(first) > target.index_of(then):
            return (
                f"it has reached {first} and {then}, which run in the other order in "
                f"v{version} (its undos would not run newest first)"
            )
    return ""


def _drops(
    source: SagaDefinition, src_at: int, removed: Mapping[str, tuple[str, bool]]
) -> tuple[str, ...]:
    """Each row a move removes, named with what it records, in the source's step order.

    Such a row never did anything that needs keeping (a move that would lose an undo, or the
    record of one, is refused before): a ``Wait`` the saga passed by (``skipped``), a step an
    earlier move skipped (pending before the current step: ``skipped`` too), one not reached
    yet (``not reached``), or one that ran with nothing left to undo (``ran``: its result stays
    in ``results`` and its history in the timeline)."""

    def what(name: str) -> str:
        status, skipped = removed[name]
        if skipped:
            return "skipped"
        if status == StepStatus.PENDING and source.has_step(name):
            return "skipped" if source.index_of(name) < src_at else "not reached"
        if status == StepStatus.SUCCEEDED:
            return "ran"
        return str(status)

    order = {name: i for i, name in enumerate(source.names)}
    names = sorted(removed, key=lambda n: (order.get(n, len(order)), n))
    return tuple(f"{name} ({what(name)})" for name in names)


def _step_rows(
    saga_ids: list[Any], target: SagaDefinition
) -> dict[Any, tuple[set[str], set[str], dict[str, tuple[str, bool]]]]:
    """Per saga, from its step rows: the steps that took effect, or may have, and are not
    undone; the steps whose undo has run (by the engine or by hand); and the rows of steps
    ``target`` lacks, which a move removes (``name -> (status, skipped)``)."""
    out: dict[Any, tuple[set[str], set[str], dict[str, tuple[str, bool]]]] = {
        sid: (set(), set(), {}) for sid in saga_ids
    }
    rows = (
        SagaStep.objects.filter(saga_id__in=saga_ids)
        .filter(Q(took_effect=True) | Q(maybe_effect=True) | Q(status__in=UNDONE_STATUSES))
        .values_list("saga_id", "name", "status")
    )
    for saga_id, name, status in rows:
        effects, undone, _ = out[saga_id]
        (undone if status in UNDONE_STATUSES else effects).add(name)
    lacking = (
        SagaStep.objects.filter(saga_id__in=saga_ids)
        .exclude(name__in=target.names)
        .values_list("saga_id", "name", "status", "result")
    )
    for saga_id, name, status, result in lacking:
        out[saga_id][2][name] = (status, result == SKIPPED)
    return out


def _lost_runs(source: SagaDefinition, sagas: list[dict[str, Any]]) -> dict[Any, list[str]]:
    """Per running saga whose current step was claimed for a first run that nothing recorded,
    and may have gone on through a run of steps recorded once: the steps after it that run may
    have reached (:func:`sagas.store.run_suspects`, by the source definition, the one the run
    ran on). The engine marks them when it claims the saga again, by the definition it then
    runs on; a move in between counts them as steps that may have taken effect, so the move
    is judged with them and carries their marks (:func:`apply_migration`)."""
    found: dict[Any, tuple[str, list[str]]] = {}
    for saga in sagas:
        cur = saga["current_step"]
        if saga["state"] == SagaState.RUNNING and saga["attempt"] >= 1 and source.has_step(cur):
            later = run_suspects(source, source.index_of(cur))
            if later:
                found[saga["id"]] = (cur, later)
    if not found:
        return {}
    recorded = set(
        SagaStep.objects.filter(saga_id__in=list(found), attempts__gt=0).values_list(
            "saga_id", "name"
        )
    )
    return {sid: later for sid, (cur, later) in found.items() if (sid, cur) not in recorded}


def _candidates(saga_type: str, from_version: int):
    return Saga.objects.filter(
        saga_type=saga_type, definition_version=from_version, state__in=UNSETTLED
    ).order_by("id")


def plan_migration(
    saga_type: str, from_version: int, to_version: int, *, chunk: int = 1000
) -> Plan:
    """Read every unfinished saga of ``saga_type`` on ``from_version`` and say what would move."""
    source, target = _definitions(saga_type, from_version, to_version)
    plan = Plan(saga_type, source, target)
    now = timezone.now()
    last = None
    while True:
        qs = _candidates(saga_type, from_version)
        if last is not None:
            qs = qs.filter(id__gt=last)
        sagas = list(qs.values(*_FIELDS)[:chunk])
        if not sagas:
            return plan
        rows = _step_rows([s["id"] for s in sagas], target)
        lost = _lost_runs(source, sagas)
        for saga in sagas:
            effects, undone, removed = rows[saga["id"]]
            effects = effects | set(lost.get(saga["id"], ()))
            plan.add(assess(source, target, saga, effects, now=now, undone=undone, removed=removed))
        last = sagas[-1]["id"]


def apply_migration(
    saga_type: str,
    from_version: int,
    to_version: int,
    *,
    actor: str,
    batch: int = 500,
    progress: Any = None,
) -> Plan:
    """Move every saga that may move, ``batch`` per transaction; return what was done.

    Sagas whose step is in flight, or that another transaction holds, are left for the next
    run. The first are counted in ``in_flight``; the second are passed by unread (``SKIP
    LOCKED``), so no verdict counts them: ``held`` does, from an unlocked count of the
    candidates each batch passed by (and of those left after the last one), so that the
    operator knows to run the command again.
    """

    source, target = _definitions(saga_type, from_version, to_version)
    plan = Plan(saga_type, source, target)
    last = None
    while True:
        with transaction.atomic():
            qs = _candidates(saga_type, from_version)
            if last is not None:
                qs = qs.filter(id__gt=last)
            sagas = list(qs.select_for_update(skip_locked=True).values(*_FIELDS)[:batch])
            if not sagas:
                plan.held += qs.count()  # every candidate left is locked by someone else
                return plan
            ids = [s["id"] for s in sagas]
            plan.held += qs.filter(id__lte=ids[-1]).exclude(id__in=ids).count()
            last = ids[-1]
            now = timezone.now()
            rows = _step_rows(ids, target)
            lost = _lost_runs(source, sagas)
            events = []
            for saga in sagas:
                effects, undone, removed = rows[saga["id"]]
                suspects = lost.get(saga["id"], [])
                effects = effects | set(suspects)
                verdict = assess(
                    source, target, saga, effects, now=now, undone=undone, removed=removed
                )
                plan.add(verdict)
                if verdict.refused or verdict.in_flight:
                    continue
                if not _move(saga, source, target, now):
                    continue  # changed under us (cannot happen while locked; fenced anyway)
                if suspects:
                    mark_maybe_effect(saga["id"], [n for n in suspects if target.has_step(n)])
                plan.moved += 1
                detail = (
                    f"definition v{source.version} -> v{target.version} at {verdict.lands_at}"
                    f" (step {source.index_of(verdict.lands_at) + 1} -> "
                    f"{target.index_of(verdict.lands_at) + 1})"
                )
                if verdict.skips:
                    detail += f"; skips {', '.join(verdict.skips)}"
                if verdict.gains:
                    detail += f"; gains {', '.join(verdict.gains)}"
                if verdict.drops:
                    detail += f"; drops {', '.join(verdict.drops)}"
                events.append(
                    SagaEvent(
                        saga_id=saga["id"],
                        at=now,
                        kind="ops_migrate",
                        step=verdict.lands_at,
                        detail=detail,
                        actor=actor[:150],
                    )
                )
                due = saga["next_attempt_at"]
                if saga["state"] != SagaState.NEEDS_MANUAL and due is not None:
                    # The bump made any queued doorbell stale: ring for the new version.
                    wait = max((due - now).total_seconds(), 0.0)
                    if wait <= 60:
                        ring_on_commit(saga["id"], saga["version"] + 1, wait or None)
            SagaEvent.objects.bulk_create(events)
            audit_ops_events(events)  # bulk_create sends no post_save
        if progress is not None:
            progress(plan)


def _move(
    saga: dict[str, Any], source: SagaDefinition, target: SagaDefinition, now: datetime
) -> bool:
    """Rewrite one locked saga and its step rows for ``target``, fenced on its version."""
    moved = (
        Saga.objects.filter(
            pk=saga["id"], version=saga["version"], definition_version=source.version
        )
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .update(
            definition_version=target.version,
            definition_fingerprint=target.fingerprint,
            step_index=target.index_of(saga["current_step"]),
            version=saga["version"] + 1,
            updated_at=now,
        )
    )
    if not moved:
        return False
    rows = {s.name: s for s in SagaStep.objects.filter(saga_id=saga["id"])}
    # Rows of steps the target does not have go (the plan names each: Verdict.drops): none
    # was undone or may still need its undo (refused above). One that took effect with nothing
    # left to undo (no compensation, or past the pivot) keeps its result in ``results`` and
    # its history in the timeline.
    gone = [name for name, row in rows.items() if not target.has_step(name)]
    SagaStep.objects.filter(saga_id=saga["id"], name__in=gone).delete()
    for i, step in enumerate(target.steps):
        row = rows.get(step.name)
        if row is None:
            SagaStep.objects.create(
                saga_id=saga["id"],
                index=i,
                name=step.name,
                idempotency_key=forward_key(saga["id"], step.name),
            )
        elif row.index != i:
            SagaStep.objects.filter(pk=row.pk).update(index=i)
    return True
