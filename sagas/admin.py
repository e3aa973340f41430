"""The ops console: where support staff find, understand and fix sagas.

Nothing here writes a saga field. The saga page is read-only; the three operations (retry now,
compensate, resolve) call :mod:`sagas.services`, which check the ``sagas.operate_saga``
permission, refuse what makes no sense and write the timeline event with the user. The same
action functions serve one saga (the buttons on its page) and a selection (the list's action
menu), including "every saga with this failure signature".

Built for a table of millions of sagas: no full ``COUNT(*)`` per page (estimated or bounded
counts), filters whose choices come from the saga definitions instead of ``SELECT DISTINCT``,
an index behind every filter and the default ordering, exact-match search, and a constant
number of queries per page.

Business apps add their own links to a saga page (an order, its payment, ...) with
:func:`register_saga_owner`, so this module imports none of them.
"""

from __future__ import annotations

import datetime
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, unquote
from uuid import UUID, uuid4

import structlog
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.core.paginator import EmptyPage, Page, PageNotAnInteger, Paginator
from django.db import connection, transaction
from django.db.models import OneToOneRel, Q, QuerySet
from django.forms import BooleanField
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

from config.api_parsers import parse_int, unique_keys
from config.text import trimmed
from sagas import (
    beat_admin,  # noqa: F401 - registers the periodic task form
    selectors,
)
from sagas.definition import (
    definition_of,
    definition_problem,
    registered_definitions,
    registered_types,
    registered_versions,
)
from sagas.exceptions import SagaOperationRefused
from sagas.models import TERMINAL_STATES, Saga, SagaEvent, SagaState, SagaStep, StepStatus
from sagas.services import (
    NOTE_MAX,
    OPS_PERMISSION,
    describe_effects,
    how_it_ended,
    saga_compensate,
    saga_compensation_plan,
    saga_definition_refusal,
    saga_effects_in_place,
    saga_refusal,
    saga_resolve,
    saga_retry_now,
    saga_stopped_before_pivot,
    saga_undo_done,
    saga_waits_on_undo,
    step_before_pivot,
)

log = structlog.get_logger("sagas.admin")

admin.site.site_header = "sagarunner ops console"
admin.site.site_title = "sagarunner ops"
admin.site.index_title = "Ops console"
# The sidebar repeats the index and costs a third of the width that the saga list needs.
admin.site.enable_nav_sidebar = False
# There is no public site to view: the API lives under /api/.
admin.site.site_url = None

#: An action acts on at most this many sagas at once; a bigger selection is refused with a
#: message asking to narrow the filter (one request must stay short, and the sweeper re-rings
#: overdue sagas anyway).
MAX_BULK = 500
#: A compensation confirmation lists each saga up to this many; beyond, only grouped plans.
MAX_LISTED = 50
#: A saga page shows at most this many timeline events (a retry storm can write thousands).
MAX_TIMELINE = 1000

#: What each state means, in words for someone who has never seen the product.
STATE_HELP: dict[str, str] = {
    SagaState.RUNNING: "Working through its steps, one after the other.",
    SagaState.COMPENSATING: "Undoing the steps that took effect, newest first.",
    SagaState.SUCCEEDED: "Every step ran. Done.",
    SagaState.COMPENSATED: "Stopped, and every step that took effect was undone. Done.",
    SagaState.NEEDS_MANUAL: (
        "A step or an undo kept failing and the saga stopped: a person must look. "
        "Retry now once the cause is fixed, or resolve it with a note saying what you did."
    ),
    SagaState.RESOLVED: "Closed by a person, with a note (see the timeline). Done.",
}

#: The engine's own stop reasons, in words (business codes such as ``out_of_stock`` speak for
#: themselves).
REASON_HELP = {
    "step_failed": "a step kept failing until its retries ran out, or an operator stopped it",
    "timed_out": "it ran past its deadline",
}

#: Timeline event kinds, in words; the raw kind is shown next to them.
EVENT_HELP = {
    "started": "Saga started",
    "step_succeeded": "Step succeeded",
    "step_retry": "Step failed with a temporary error; it will be retried",
    "step_failed": "Step failed",
    "compensation_started": "Undoing the steps that took effect",
    "compensation_succeeded": "Step undone",
    "compensation_retry": "Undo failed with a temporary error; it will be retried",
    "compensation_failed": "Undo failed for good",
    "compensated": "Everything undone: saga compensated",
    "succeeded": "Every step ran: saga succeeded",
    "needs_manual": "Stopped: needs a person",
    "cancel_requested": "Cancel requested",
    "cancel_honoured": "Cancel honoured at a step boundary",
    "ops_retry": "Operator: retry now",
    "ops_compensate": "Operator: compensate",
    "ops_resolve": "Operator: resolved with a note",
    "ops_undo_done": "Operator: did this undo by hand; the rest of the undo goes on",
}


class _NotJson(Exception):
    """The signal form's payload text is not JSON this console reads."""


def _json_payload(text: str) -> Any:
    """The signal form's payload; :class:`_NotJson` for text that is not JSON, holds an
    integer of thousands of digits, names a key twice in one object or nests too deeply, as
    the API refuses them (``ValueError`` there, only there, means the text)."""
    try:
        return json.loads(text or "{}", parse_int=parse_int, object_pairs_hook=unique_keys)
    except RecursionError:
        raise _NotJson("the payload is nested too deeply") from None
    except ValueError as exc:
        raise _NotJson(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Links from business apps (an order and its payment, reservation, shipment)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SagaLink:
    label: str
    text: str
    url: str | None = None


@dataclass(frozen=True)
class SagaOwner:
    """A business record that owns sagas through a one-to-one field to :class:`Saga`.

    ``accessor`` is the reverse accessor on ``Saga`` (``"order"``): the list fetches the owners
    of a page's sagas in one extra query. ``links(saga, owner)`` returns the links shown on the
    saga page; it may run a few queries of its own (a constant number).
    """

    accessor: str
    label: str
    links: Callable[[Saga, Any], list[SagaLink]]


_OWNERS: dict[str, SagaOwner] = {}


def register_saga_owner(owner: SagaOwner) -> None:
    """Called from a business app's ``admin.py`` (imports run from business apps to sagas)."""
    _OWNERS[owner.accessor] = owner


def _owner_of(saga: Saga) -> tuple[SagaOwner, Any] | None:
    for owner in _OWNERS.values():
        try:
            record = getattr(saga, owner.accessor)
        except ObjectDoesNotExist:
            continue
        if record is not None:
            return owner, record
    return None


def admin_url(obj: Any) -> str | None:
    """The admin page of ``obj``, or ``None`` if it has no admin (or no primary key)."""
    if obj is None or obj.pk is None:
        return None
    opts = obj._meta
    try:
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    except NoReverseMatch:
        return None


# ---------------------------------------------------------------------------------------------
# Pagination without a full COUNT(*)
# ---------------------------------------------------------------------------------------------
class EstimatedCountPaginator(Paginator):
    """Counts cheaply: the planner's table size when unfiltered, a bounded count when filtered.

    Unfiltered lists read ``pg_class.reltuples`` (kept fresh by autovacuum/ANALYZE) instead of
    counting; small or never analysed tables are counted exactly. Filtered lists count at most
    ``filtered_cap + 1`` rows and fall back to the planner's estimate above that. Either way
    ``count_is_estimate`` tells the templates to say "about". Pages past an estimated end are
    simply empty instead of an error.
    """

    exact_below = 10_000
    filtered_cap = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_is_estimate = False

    @cached_property
    def count(self) -> int:
        qs = self.object_list
        if not isinstance(qs, QuerySet) or connection.vendor != "postgresql":
            return super().count
        if not qs.query.where:
            estimate = _table_estimate(qs.model._meta.db_table)
            if estimate >= self.exact_below:
                self.count_is_estimate = True
                return estimate
            return qs.count()
        counted = selectors.saga_count_bounded(qs, cap=self.filtered_cap)
        self.count_is_estimate = not counted.exact
        return counted.value

    def validate_number(self, number: Any) -> int:
        if not self.count_is_estimate:
            return super().validate_number(number)
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise PageNotAnInteger("That page number is not an integer") from None
        if number < 1:
            raise EmptyPage("That page number is less than 1")
        return number

    def page(self, number: Any):
        if not self.count_is_estimate:
            return super().page(number)
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        return Page(self.object_list[bottom : bottom + self.per_page], number, self)


def _table_estimate(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    return int(row[0]) if row else -1


class ScalableAdminMixin:
    """What every list over a big table needs: no full counts, no facet counts."""

    paginator: ClassVar[type[Paginator]] = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = ShowFacets.NEVER


def parse_uuid(term: str) -> UUID | None:
    try:
        return UUID(term.strip())
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Filters: choices come from the saga definitions (or a bounded read), never SELECT DISTINCT
# ---------------------------------------------------------------------------------------------
class SagaTypeFilter(admin.SimpleListFilter):
    title = "type"
    parameter_name = "saga_type"

    def lookups(self, request, model_admin):
        return [(name, name) for name in registered_types()]

    def queryset(self, request, queryset):
        return queryset.filter(saga_type=self.value()) if self.value() else queryset


class DefinitionVersionFilter(admin.SimpleListFilter):
    """The definition version a saga runs on; choices from the registered versions and the
    versions unfinished sagas are on (one read of a small partial index)."""

    title = "definition version"
    parameter_name = "definition_version"

    def lookups(self, request, model_admin):
        versions = {v for t in registered_types() for v in registered_versions(t)}
        versions |= {c.version for c in selectors.unsettled_versions()}
        return [(str(v), f"v{v}") for v in sorted(versions)]

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(definition_version=int(value))


def _step_names() -> list[str]:
    names: list[str] = []
    for definition in registered_definitions():
        for step in definition.steps:
            if step.name not in names:
                names.append(step.name)
    return names


class FailedStepFilter(admin.SimpleListFilter):
    title = "failed step"
    parameter_name = "failed_step"

    def lookups(self, request, model_admin):
        return [(name, name) for name in _step_names()]

    def queryset(self, request, queryset):
        return queryset.filter(failed_step=self.value()) if self.value() else queryset


class FailedUndoFilter(admin.SimpleListFilter):
    """The step whose undo kept failing: a separate fact from the forward failure."""

    title = "failed undo"
    parameter_name = "failed_undo"

    def lookups(self, request, model_admin):
        names: list[str] = []
        for definition in registered_definitions():
            for step in definition.steps:
                if step.compensate is not None and step.name not in names:
                    names.append(step.name)
        return [(name, f"undo of {name}") for name in names]

    def queryset(self, request, queryset):
        return queryset.filter(failed_undo=self.value()) if self.value() else queryset


class FinishedFilter(admin.SimpleListFilter):
    """Finished or not, as the dashboard's per-version counts read it: a saga is unfinished
    while it still needs its definition (running, compensating, or waiting for a person)."""

    title = "finished"
    parameter_name = "finished"

    def lookups(self, request, model_admin):
        return [
            ("no", "Not finished (running, compensating, needs a person)"),
            ("yes", "Finished (succeeded, compensated, resolved)"),
        ]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(state__in=selectors.UNSETTLED)
        if self.value() == "yes":
            return queryset.exclude(state__in=selectors.UNSETTLED)
        return queryset


class StuckFilter(admin.SimpleListFilter):
    title = "progress"
    parameter_name = "stuck"

    def lookups(self, request, model_admin):
        return [("yes", f"Stuck (no progress for over {settings.SAGA_STUCK_AFTER:g}s)")]

    def queryset(self, request, queryset):
        return queryset.filter(selectors.saga_stuck_q()) if self.value() == "yes" else queryset


def _signal_names() -> list[str]:
    names: list[str] = []
    for definition in registered_definitions():
        names += [n for n in definition.signals if n not in names]
    return names


class WaitingForFilter(admin.SimpleListFilter):
    """Parked sagas, by the signal they wait for (or parked at a timer)."""

    title = "waiting for"
    parameter_name = "waiting_for"

    STAFF = selectors.STAFF_WAITS

    def lookups(self, request, model_admin):
        return [
            ("*", "Any signal or timer"),
            (self.STAFF, "A signal only staff send"),
        ] + [(n, f"signal {n}") for n in _signal_names()]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        if self.value() == self.STAFF:
            return queryset.filter(selectors.saga_waiting_for_staff_q())
        parked = queryset.filter(waiting_since__isnull=False)
        return parked if self.value() == "*" else parked.filter(waiting_for=self.value())


class WaitingAgeFilter(admin.SimpleListFilter):
    title = "waiting longer than"
    parameter_name = "waiting_age"
    AGES = {"1m": 60, "1h": 3600, "1d": 86400}

    def lookups(self, request, model_admin):
        return [("1m", "a minute"), ("1h", "an hour"), ("1d", "a day")]

    def queryset(self, request, queryset):
        seconds = self.AGES.get(self.value() or "")
        if seconds is None:
            return queryset
        since = timezone.now() - datetime.timedelta(seconds=seconds)
        return queryset.filter(waiting_since__lte=since)


def signature_value(failed_step: str, failure_code: str) -> str:
    return f"{failed_step}:{failure_code}"


def parse_signature(value: str) -> tuple[str, str] | None:
    step, sep, code = (value or "").partition(":")
    return (step, code) if sep and step else None


class FailureSignatureFilter(admin.SimpleListFilter):
    """Sagas that failed at the same step with the same code: one cause, acted on together."""

    title = "failure signature (step: code)"
    parameter_name = "signature"

    def lookups(self, request, model_admin):
        since = timezone.now() - datetime.timedelta(hours=24)
        choices = OrderedDict(
            (
                signature_value(s["failed_step"], s["failure_code"]),
                f"{s['failed_step']}: {s['failure_code'] or '(no code)'} ({s['count']} in 24h)",
            )
            for s in selectors.saga_failure_signatures(since=since, limit=8)
        )
        current = self.value()
        parsed = parse_signature(current) if current and current not in choices else None
        if current and parsed:
            step, code = parsed
            choices[current] = f"{step}: {code or '(no code)'}"
        return list(choices.items())

    def queryset(self, request, queryset):
        parsed = parse_signature(self.value() or "")
        if parsed is None:
            return queryset
        return queryset.filter(failed_step=parsed[0], failure_code=parsed[1])


# ---------------------------------------------------------------------------------------------
# Action forms
# ---------------------------------------------------------------------------------------------
def _selected_ids(queryset: QuerySet[Saga]) -> list[Any]:
    return list(queryset.order_by().values_list("pk", flat=True)[: MAX_BULK + 1])


def _is_uuid(value: str) -> bool:
    """Whether a posted saga id is one (as the UUID field reads it: no stray spaces)."""
    try:
        UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def _short(saga_id: Any) -> str:
    return str(saga_id)[:8]


def _shortlist(saga_ids: list[Any]) -> str:
    """The first ten sagas' short ids, for a message about all of them."""
    return ", ".join(_short(i) for i in saga_ids[:10]) + (" ..." if len(saga_ids) > 10 else "")


def _next_url(request: HttpRequest) -> str | None:
    url = request.POST.get("next", "")
    if url and url_has_allowed_host_and_scheme(
        url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return url
    return None


# The one hidden field in which a confirmation page (or a button on a saga's page) posts back
# what each saga it accepted looked like: ``<id>:<version>:<step>`` per saga, joined by ``;``
# (the step, percent-encoded, is the undo an undo-done confirmation names; empty elsewhere).
# One field for all of them: a field per saga and per value came to three fields a saga, and a
# confirmation of 334 sagas went over Django's DATA_UPLOAD_MAX_NUMBER_FIELDS (a 400, nothing
# done) while an action takes MAX_BULK. The ids still go as ``_selected_action``, one a saga,
# which Django's action handling filters on: MAX_BULK of them and a few more stay far under.
FENCES_FIELD = "fences"
_FENCE_MAX_CHARS = 36 + 1 + 19 + 1 + 3 * 64  # an id, a version, a step of 64 encoded


class _BadFences(ValueError):
    """The fence field is not one a page of this console wrote."""


def fences_field(fences: Iterable[tuple[Any, int, str]]) -> str:
    """The fence field's value for ``(id, version, step)`` of each saga."""
    return ";".join(
        f"{saga_id}:{version}:{quote(step, safe='')}" for saga_id, version, step in fences
    )


def _parse_fences(value: str) -> dict[UUID, tuple[int, str]]:
    """The fence field read strictly: each saga's version and step by its id. Raises
    :class:`_BadFences` saying what is wrong with anything else."""
    entries = value.split(";")
    if len(value) > MAX_BULK * (_FENCE_MAX_CHARS + 1) or len(entries) > MAX_BULK:
        raise _BadFences(f"it names more than {MAX_BULK} sagas")
    fences: dict[UUID, tuple[int, str]] = {}
    for entry in entries:
        parts = entry.split(":")
        if len(parts) != 3 or not _is_uuid(parts[0]):
            raise _BadFences(f"{entry[:60]!r} is not a saga id, a version and a step")
        saga_id, version, step = UUID(parts[0]), parts[1], unquote(parts[2])
        if not (version.isascii() and version.isdigit() and len(version) <= 19):
            raise _BadFences(f"the version of {_short(saga_id)} is not one")
        if len(step) > 64:
            raise _BadFences(f"the step of {_short(saga_id)} is not one")
        if saga_id in fences:
            raise _BadFences(f"it names {_short(saga_id)} twice")
        fences[saga_id] = (int(version), step)
    return fences


def _posted_fences(request: HttpRequest) -> dict[UUID, tuple[int, str]] | None:
    """The posted fence field, read once per request; None when the post has none (the list's
    action bar). Raises :class:`_BadFences` (``response_action`` refuses such a post first)."""
    if FENCES_FIELD not in request.POST:
        return None
    cached = getattr(request, "_saga_fences", None)
    if cached is None:
        cached = _parse_fences(request.POST[FENCES_FIELD])
        setattr(request, "_saga_fences", cached)  # noqa: B010 - not a field of HttpRequest
    return cached


def _posted_fence(request: HttpRequest, saga_id: Any) -> tuple[int, str] | None:
    """What the page showed of this saga: its version and step, or None when the post carries
    no fences. A saga posted without one in a post that has them is refused."""
    try:
        fences = _posted_fences(request)
    except _BadFences:
        fences = {}
    if fences is None:
        return None
    fence = fences.get(UUID(str(saga_id)))
    if fence is None:
        raise SagaOperationRefused(
            "changed", "The page gave no version of this saga; reload and decide again."
        )
    return fence


def _posted_version(request: HttpRequest, saga_id: Any) -> int | None:
    """The version of the saga as the operator's page showed it (the fence field: a button on
    its page, a confirmation page), which the services fence on: a double submit or a stale
    page is refused (``changed``) rather than acting again. None when the post carries none
    (the list's action bar, which shows no versions)."""
    fence = _posted_fence(request, saga_id)
    if fence is not None:
        return fence[0]
    # A page rendered before the fences were one field posted ``version_<id>``.
    value = request.POST.get(f"version_{saga_id}")
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise SagaOperationRefused(
            "changed", "The page's version of this saga is not one; reload and decide again."
        )
    return int(value)


def _posted_step(request: HttpRequest, saga_id: Any) -> str:
    """The undo an undo-done confirmation showed this saga waiting on ("" if none)."""
    fence = _posted_fence(request, saga_id)
    if fence is not None:
        return fence[1]
    return request.POST.get(f"step_{saga_id}", "")  # a page from before the fence field


def _signal_received(saga: Saga, pending: set[str]) -> str:
    """The signal a saga's wait took and no worker has consumed yet ("" if none): accepting it
    cleared ``waiting_for``, but the saga stands at the wait (``waiting_since``) until then."""
    if saga.waiting_since is None or saga.waiting_for or not pending:
        return ""
    try:
        definition = definition_of(saga)
        park = definition.steps[definition.index_of(saga.current_step)].park
    except LookupError:  # a type, version or step this process does not know
        return ""
    return park.signal if park is not None and park.signal in pending else ""


def _predicted_refusal(saga: Saga, operation: str) -> str:
    """Why the services will refuse ``operation`` on this saga, or "" if they should accept it.

    The services decide (:func:`sagas.services.saga_refusal`); the console only asks first.
    """
    try:
        refusal = saga_refusal(saga, operation)
    except LookupError:  # a step its version lacks: let the service say so
        return ""
    return "" if refusal is None else refusal.detail.rstrip(".")


class _Outcome:
    """Collects per-saga results of a bulk operation into a few clear messages."""

    def __init__(self) -> None:
        self.done: list[Any] = []
        self.refused: dict[str, list[Any]] = {}

    def run(self, ids: Iterable[Any], operation: Callable[[Any], Any]) -> None:
        for saga_id in ids:
            try:
                # One transaction per saga: a refusal leaves nothing behind, not even an event.
                with transaction.atomic():
                    operation(saga_id)
            except SagaOperationRefused as refusal:
                self.refused.setdefault(refusal.detail, []).append(saga_id)
            except LookupError:
                # The services refuse what needs a definition this code lacks; a read they do
                # not guard is refused here too, its transaction rolled back, not a 500 after
                # the sagas before it were acted on.
                log.exception("saga.ops_lookup_failed", saga_id=str(saga_id))
                self.refused.setdefault(
                    "Could not act on it: something it needs is missing from this code (its "
                    "definition, a step of it); nothing was changed.",
                    [],
                ).append(saga_id)
            else:
                self.done.append(saga_id)

    def report(self, request: HttpRequest, done_message: str) -> None:
        if self.done:
            n = len(self.done)
            ids = _shortlist(self.done)
            messages.success(request, f"{done_message} for {n} saga{'s' if n != 1 else ''}: {ids}")
        for detail, refused in self.refused.items():
            n = len(refused)
            shown = _shortlist(refused)
            messages.error(
                request, f"Refused for {n} saga{'s' if n != 1 else ''} ({shown}): {detail}"
            )


# ---------------------------------------------------------------------------------------------
# The saga admin
# ---------------------------------------------------------------------------------------------
@admin.register(Saga)
class SagaAdmin(ScalableAdminMixin, admin.ModelAdmin):
    list_display = (
        "saga_link",
        "type_version",
        "state_badge",
        "step_column",
        "attempt_column",
        "last_error_short",
        "age",
        "owner_link",
    )
    list_display_links = None
    list_filter = (
        "state",
        FinishedFilter,
        StuckFilter,
        SagaTypeFilter,
        DefinitionVersionFilter,
        FailedStepFilter,
        FailedUndoFilter,
        FailureSignatureFilter,
        WaitingForFilter,
        WaitingAgeFilter,
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    # get_search_results does exact lookups; this only makes the admin show the search box.
    search_fields = ("id",)
    search_help_text = (
        "Exact saga id, order id or correlation id (the whole value: no partial matches)."
    )
    list_per_page = 50
    actions = ("retry_now", "compensate", "undo_done", "resolve")
    audited_actions = frozenset(actions)  # each is an ops event, and so an audit entry
    readonly_fields = (
        "state_explained",
        "definition_explained",
        "waiting_explained",
        "data_pretty",
        "results_pretty",
    )
    change_list_template = "admin/sagas/saga/change_list.html"
    change_form_template = "admin/sagas/saga/change_form.html"
    fieldsets = (
        (
            "What happened",
            {
                "fields": (
                    "id",
                    "saga_type",
                    "definition_explained",
                    "state_explained",
                    "waiting_explained",
                    "current_step",
                    "attempt",
                    "failed_step",
                    "failure_code",
                    "failed_undo",
                    "last_error",
                    "cancel_reason",
                    "escalated_from",
                )
            },
        ),
        ("When", {"fields": ("created_at", "updated_at", "next_attempt_at", "finished_at")}),
        (
            "Engine internals",
            {
                "classes": ("collapse",),
                "description": "What the engine uses to run the saga safely; rarely needed.",
                "fields": (
                    "correlation_id",
                    "step_index",
                    "version",
                    "lease_until",
                    "deadline_at",
                    "data_pretty",
                    "results_pretty",
                ),
            },
        ),
    )

    # -- permissions: read-only pages; operations only through the actions --------------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Saga | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Saga | None = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(OPS_PERMISSION)

    # -- list ----------------------------------------------------------------------------------
    def get_list_select_related(self, request: HttpRequest) -> tuple[str, ...]:
        # The owners (an order) are reverse one-to-ones: get_queryset prefetches them for the
        # page's rows in one query, so the list query itself sorts and limits sagas alone.
        return ()

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Saga], search_term: str
    ) -> tuple[QuerySet[Saga], bool]:
        """Exact matches only, each served by an index: saga id, an owner's id, correlation id."""
        term = search_term.strip()
        if not term:
            return queryset, False
        condition = Q(correlation_id=term)
        as_uuid = parse_uuid(term)
        if as_uuid is not None:
            ids = {as_uuid}
            for owner in _OWNERS.values():
                # The reverse side of the owner's one-to-one field to its saga.
                rel = Saga._meta.get_field(owner.accessor)
                assert isinstance(rel, OneToOneRel)
                ids.update(
                    rel.related_model._default_manager.filter(pk=as_uuid).values_list(
                        rel.field.attname, flat=True
                    )
                )
            condition |= Q(pk__in=ids)
        return queryset.filter(condition), False

    @admin.display(description="saga", ordering="created_at")
    def saga_link(self, saga: Saga) -> str:
        url = reverse("admin:sagas_saga_change", args=[saga.pk])
        return format_html(
            '<a href="{}" title="{}"><code>{}</code></a>', url, saga.pk, _short(saga.pk)
        )

    @admin.display(description="type", ordering="saga_type")
    def type_version(self, saga: Saga) -> str:
        problem = (
            definition_problem(saga.saga_type, saga.definition_version, saga.definition_fingerprint)
            if saga.state in selectors.UNSETTLED
            else ""
        )
        return format_html(
            "{} v{}{}",
            saga.saga_type,
            saga.definition_version,
            format_html(
                ' <span class="saga-stuck" title="{}">waiting for its definition</span>', problem
            )
            if problem
            else "",
        )

    @admin.display(description="definition")
    def definition_explained(self, saga: Saga) -> str:
        problem = definition_problem(
            saga.saga_type, saga.definition_version, saga.definition_fingerprint
        )
        shape = saga.definition_fingerprint or "recorded before fingerprints"
        if not problem:
            return format_html("version {} (shape {})", saga.definition_version, shape)
        waiting = saga.state in selectors.UNSETTLED
        return format_html(
            'version {} (shape {}) <span class="saga-stuck">{}</span> {}',
            saga.definition_version,
            shape,
            "waiting for its definition" if waiting else "not registered",
            problem,
        )

    @admin.display(description="state")
    def state_badge(self, saga: Saga) -> str:
        stuck = selectors.saga_is_stuck(saga)
        return format_html(
            '<span class="saga-state saga-state-{}" title="{}">{}</span>{}',
            saga.state,
            STATE_HELP.get(saga.state, ""),
            saga.get_state_display(),
            format_html(' <span class="saga-stuck" title="{}">stuck</span>', _stuck_help())
            if stuck
            else "",
        )

    @admin.display(description="step")
    def step_column(self, saga: Saga) -> str:
        if saga.failed_undo:
            cause = (
                format_html(
                    "<br>after failing at <strong>{}</strong>{}",
                    saga.failed_step,
                    f" ({saga.failure_code})" if saga.failure_code else "",
                )
                if saga.failed_step
                else format_html("<br>undoing because of {}", saga.failure_code)
                if saga.failure_code
                else ""
            )
            return format_html("undo of <strong>{}</strong> failed{}", saga.failed_undo, cause)
        if saga.failed_step:
            code = f" ({saga.failure_code})" if saga.failure_code else ""
            return format_html("failed at <strong>{}</strong>{}", saga.failed_step, code)
        if saga.state in (SagaState.RUNNING, SagaState.COMPENSATING):
            verb = "undoing" if saga.state == SagaState.COMPENSATING else "at"
            return format_html("{} <strong>{}</strong>", verb, saga.current_step)
        if saga.state == SagaState.COMPENSATED and saga.failure_code:
            return format_html("cancelled ({})", saga.failure_code)
        return "-"

    @admin.display(description="attempt")
    def attempt_column(self, saga: Saga) -> str:
        """Attempts of the step in hand; blank once the saga is done.

        ``attempt`` counts claims of the current step (or undo) and the engine sets it back to
        0 when a saga finishes, so a finished saga has no step in hand and a "0" would read as
        "never tried". A saga that needs a person keeps the count of the step that stopped it.
        """
        if saga.state in TERMINAL_STATES:
            return ""
        return format_html(
            '<span title="attempts of the {} in hand">{}</span>',
            "undo" if saga.state == SagaState.COMPENSATING or saga.failed_undo else "step",
            saga.attempt,
        )

    @admin.display(description="last error")
    def last_error_short(self, saga: Saga) -> str:
        if not saga.last_error:
            return "-"
        text = saga.last_error if len(saga.last_error) <= 70 else saga.last_error[:69] + "..."
        return format_html('<span title="{}">{}</span>', saga.last_error, text)

    @admin.display(description="age", ordering="created_at")
    def age(self, saga: Saga) -> str:
        if timezone.now() - saga.created_at < datetime.timedelta(minutes=1):
            return "under a minute"
        return timesince(saga.created_at, depth=1)

    @admin.display(description="belongs to")
    def owner_link(self, saga: Saga) -> str:
        found = _owner_of(saga)
        if found is None:
            return "-"
        owner, record = found
        url = admin_url(record)
        text = f"{owner.label} {_short(record.pk)}"
        return format_html('<a href="{}">{}</a>', url, text) if url else text

    # -- the saga page -------------------------------------------------------------------------
    @admin.display(description="state")
    def state_explained(self, saga: Saga) -> str:
        stuck = selectors.saga_is_stuck(saga)
        return format_html(
            '<span class="saga-state saga-state-{}">{}</span>{}',
            saga.state,
            saga.get_state_display(),
            mark_safe(' <span class="saga-stuck">stuck</span>') if stuck else "",
        )

    @admin.display(description="data (input)")
    def data_pretty(self, saga: Saga) -> str:
        return format_html("<pre>{}</pre>", json.dumps(saga.data, indent=2, sort_keys=True))

    @admin.display(description="results of the steps")
    def results_pretty(self, saga: Saga) -> str:
        return format_html("<pre>{}</pre>", json.dumps(saga.results, indent=2, sort_keys=True))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Saga]:
        return super().get_queryset(request).prefetch_related(*_OWNERS)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """The saga page reads the saga, its steps and its timeline from one snapshot, so a
        worker recording a step meanwhile cannot make them disagree."""
        if connection.vendor != "postgresql" or connection.in_atomic_block:
            return super().changeform_view(request, object_id, form_url, extra_context)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return super().changeform_view(request, object_id, form_url, extra_context)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self._saga_page_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _saga_page_context(self, request: HttpRequest, saga: Saga) -> dict[str, Any]:
        steps = list(SagaStep.objects.filter(saga=saga).order_by("index"))
        for step in steps:
            step.compensation = _compensation_name(saga, step.name) if step.name else ""
            step.how_it_ended = how_it_ended(step.last_error) if step.last_error else ""
        events = list(SagaEvent.objects.filter(saga=saga).order_by("id")[: MAX_TIMELINE + 1])
        links: list[SagaLink] = []
        found = _owner_of(saga)
        if found is not None:
            links = found[0].links(saga, found[1])
        changelist = reverse("admin:sagas_saga_changelist")
        signature = None
        if saga.failed_step:
            same = selectors.sagas_with_failure_signature(
                failed_step=saga.failed_step, failure_code=saga.failure_code
            )
            sig = signature_value(saga.failed_step, saga.failure_code)
            same_state = same.filter(state=saga.state)
            signature = {
                "failed_step": saga.failed_step,
                "failure_code": saga.failure_code,
                "all_url": f"{changelist}?signature={sig}",
                "all_count": selectors.saga_count_bounded(same, cap=MAX_BULK),
                "state_url": f"{changelist}?signature={sig}&state__exact={saga.state}",
                "state_count": selectors.saga_count_bounded(same_state, cap=MAX_BULK),
            }
        problem = _problem(saga, steps)
        failing = None
        if problem and problem["step"]:
            failing = next((s for s in steps if s.name == problem["step"]), None)
        return {
            "saga": saga,
            "steps": steps,
            "events": [(e, EVENT_HELP.get(e.kind, e.kind)) for e in events[:MAX_TIMELINE]],
            "timeline_truncated": len(events) > MAX_TIMELINE,
            "max_timeline": MAX_TIMELINE,
            "links": links,
            "signature": signature,
            "problem": problem,
            "failing_step": failing,
            "can_operate": self.has_operate_permission(request),
            # A step in flight ends soon: its saga keeps the button (the service says "wait").
            "offer_retry": getattr(saga_refusal(saga, "retry"), "code", None)
            in (None, "in_flight"),
            "offer_compensate": not saga.cancel_reason
            and not _predicted_refusal(saga, "compensate"),
            "offer_resolve": saga.state == SagaState.NEEDS_MANUAL
            and not _predicted_refusal(saga, "resolve"),
            "offer_undo_done": saga_waits_on_undo(saga)
            and not _predicted_refusal(saga, "undo_done"),
            "is_finished": saga.state in TERMINAL_STATES,
            "changelist_url": changelist,
            "is_stuck": selectors.saga_is_stuck(saga),
            "definition_missing": definition_problem(
                saga.saga_type, saga.definition_version, saga.definition_fingerprint
            )
            if saga.state in selectors.UNSETTLED
            else "",
            "state_help": STATE_HELP.get(saga.state, ""),
            "stuck_help": _stuck_help(),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "fences_name": FENCES_FIELD,
            "fences": fences_field([(saga.pk, saga.version, "")]),
        }

    # -- dashboard -----------------------------------------------------------------------------
    def get_urls(self):
        urls = super().get_urls()
        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="sagas_saga_dashboard",
        )
        send_signal = path(
            "<uuid:saga_id>/signal/",
            self.admin_site.admin_view(self.signal_view),
            name="sagas_saga_signal",
        )
        return [dashboard, send_signal, *urls]

    # -- signals -------------------------------------------------------------------------------
    @admin.display(description="Waiting")
    def waiting_explained(self, saga: Saga) -> str:
        """What a parked saga waits for, the signals it holds, and the way to send one."""
        from sagas.signals import signals_taken

        try:
            # Only the signals it can still take: a settled or compensating saga takes none.
            names = signals_taken(definition_of(saga), saga)
        except LookupError:  # a type or version this process does not know
            names = []
        parts = []
        pending = list(saga.signals.filter(consumed_at__isnull=True).values_list("name", "actor"))
        received = _signal_received(saga, {name for name, _ in pending})
        if received:
            # Accepted, so the saga waits no longer (waiting_for is cleared), yet it still
            # stands at its wait until a worker takes the signal: not a timer due "now".
            parts.append(
                format_html(
                    "<strong>Signal {} received</strong>; the saga goes on as soon as a worker "
                    "takes it",
                    received,
                )
            )
        elif saga.waiting_since is not None:
            what = f"signal {saga.waiting_for}" if saga.waiting_for else "its timer"
            due = (
                f"; times out at {saga.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC"
                if saga.next_attempt_at
                else "; no timeout"
            )
            parts.append(
                format_html(
                    "<strong>Waiting for {}</strong> since {} ({} ago){}",
                    what,
                    f"{saga.waiting_since:%Y-%m-%d %H:%M:%S} UTC",
                    timesince(saga.waiting_since),
                    due,
                )
            )
        later = [(name, actor) for name, actor in pending if name != received]
        if later:
            parts.append(
                format_html(
                    "Kept for later: {}",
                    ", ".join(f"{name} (from {actor})" for name, actor in later),
                )
            )
        if set(names) - {name for name, _ in pending}:  # one already waiting is refused
            url = reverse("admin:sagas_saga_signal", args=[saga.pk])
            parts.append(
                format_html(
                    '<a class="button signal-button" href="{}">Send a signal&hellip;</a>', url
                )
            )
        return mark_safe("<br>".join(str(p) for p in parts)) if parts else "-"  # noqa: S308

    def signal_view(self, request: HttpRequest, saga_id: UUID) -> HttpResponse:
        """A form to send one of the saga type's signals, with a JSON payload."""
        from sagas.exceptions import SignalKeyInvalid, SignalKeyReused, SignalPayloadInvalid
        from sagas.signals import saga_signal

        if not self.has_operate_permission(request):
            raise PermissionDenied
        saga = Saga.objects.filter(pk=saga_id).first()
        if saga is None:
            messages.error(request, "No such saga.")
            return HttpResponseRedirect(reverse("admin:sagas_saga_changelist"))
        page = reverse("admin:sagas_saga_change", args=[saga.pk])
        missing = saga_definition_refusal(saga)
        if missing is not None:  # the services' words (definition_missing), then the form's
            messages.error(request, f"{missing.detail} Until then it takes no signal here.")
            return HttpResponseRedirect(page)
        names = definition_of(saga).signals
        # Preselected only when the saga waits for it: a saga not waiting yet keeps a signal
        # for later, and a first signal offered by default could be sent by one careless click.
        form = {
            "name": request.POST.get("name", saga.waiting_for),
            "payload": request.POST.get("payload", "{}"),
            "key": request.POST.get("key", ""),
            # The form's own key, made as it renders, used when the operator gives none: the
            # same form sent twice (a double click, back and send again) is a replay of the
            # signal it sent, not a second signal refused as one already waiting.
            "form_key": request.POST.get("form_key", "") or uuid4().hex,
        }
        error = ""
        if request.method == "POST" and not form["name"]:
            error = "Choose the signal to send."
        elif request.method == "POST":
            own_key = not form["key"].strip()
            try:
                payload = _json_payload(form["payload"])
                outcome = saga_signal(
                    saga_id=saga.pk,
                    name=form["name"],
                    payload=payload,
                    key=form["key"].strip() or form["form_key"],
                    user=request.user,
                )
            except _NotJson as exc:
                error = f"The payload is not JSON: {exc}"
            except RecursionError:
                error = "The payload is nested too deeply to read."
            except (
                SignalPayloadInvalid,
                SignalKeyInvalid,
                SignalKeyReused,
                SagaOperationRefused,
            ) as exc:
                error = exc.detail
                if isinstance(exc, SignalKeyReused) and own_key:
                    error = (
                        f"This form already sent {form['name']} with another payload; that "
                        "signal stands. Open the form again to send a new one."
                    )
            else:
                if outcome.replayed and own_key:
                    messages.info(
                        request,
                        f"Signal {form['name']} was already sent from this form; "
                        "nothing more was done.",
                    )
                elif outcome.replayed:
                    messages.info(request, f"Signal {form['name']} with this key was already sent.")
                elif outcome.delivered_now:
                    messages.success(request, f"Signal {form['name']} sent; the saga goes on.")
                else:
                    messages.success(
                        request, f"Signal {form['name']} kept until the saga reaches its wait."
                    )
                return HttpResponseRedirect(page)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Send a signal to {saga.saga_type} saga {_short(saga.pk)}",
            "opts": self.opts,
            "saga": saga,
            "names": names,
            "form": form,
            "error": error,
            "page_url": page,
        }
        return TemplateResponse(request, "admin/sagas/saga/signal_form.html", context)

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        changelist = reverse("admin:sagas_saga_changelist")
        counts = selectors.saga_state_counts()
        since = timezone.now() - datetime.timedelta(hours=24)
        signatures = [
            {
                **s,
                "url": f"{changelist}?signature="
                f"{signature_value(s['failed_step'], s['failure_code'])}",
            }
            for s in selectors.saga_failure_signatures(since=since, limit=10)
        ]
        waiting = list(
            Saga.objects.filter(state=SagaState.NEEDS_MANUAL)
            .prefetch_related(*_OWNERS)
            .order_by("-created_at")[:10]
        )
        context = {
            **self.admin_site.each_context(request),
            "title": "Saga dashboard",
            "opts": self.opts,
            "states": [
                {
                    "state": state,
                    "label": label,
                    "help": STATE_HELP.get(state, ""),
                    "count": counts[state],
                    "url": f"{changelist}?state__exact={state}",
                }
                for state, label in SagaState.choices
            ],
            "stuck": selectors.saga_count_bounded(
                Saga.objects.filter(selectors.saga_stuck_q()), cap=MAX_BULK * 20
            ),
            "stuck_url": f"{changelist}?stuck=yes",
            "stuck_help": _stuck_help(),
            "staff_waits": selectors.saga_count_bounded(
                Saga.objects.filter(selectors.saga_waiting_for_staff_q()), cap=MAX_BULK * 20
            ),
            "staff_waits_url": f"{changelist}?waiting_for={WaitingForFilter.STAFF}",
            "signatures": signatures,
            "versions": _version_rows(changelist),
            "waiting": [(s, self.owner_link(s), self.step_column(s)) for s in waiting],
            "changelist_url": changelist,
            "sweep_task_url": _sweep_task_url()
            if request.user.has_perm("django_celery_beat.view_periodictask")
            else None,
            **_provider_breakers(request),
        }
        return TemplateResponse(request, "admin/sagas/saga/dashboard.html", context)

    def changelist_view(self, request, extra_context=None):
        extra = {
            "title": "Sagas",
            "dashboard_url": reverse("admin:sagas_saga_dashboard"),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=extra)

    # -- actions -------------------------------------------------------------------------------
    def response_action(
        self, request: HttpRequest, queryset: QuerySet[Saga], *args: Any, **kwargs: Any
    ) -> HttpResponse | None:
        """Django's action handling, once the posted saga ids are known to be ids: it filters
        by them, and a value that is not a UUID raised a ValidationError there (a 500)."""
        bad = [v for v in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME) if not _is_uuid(v)]
        if bad:
            shown = ", ".join(repr(v[:40]) for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
            messages.error(request, f"Not a saga id: {shown}. Nothing was done.")
            return self._done(request)
        try:
            _posted_fences(request)
        except _BadFences as bad_fences:
            messages.error(
                request,
                f"The page's versions of the sagas are not ones this console wrote "
                f"({bad_fences}). Nothing was done; reload the list and decide again.",
            )
            return self._done(request)
        return super().response_action(request, queryset, *args, **kwargs)

    def _ids_or_refuse(self, request: HttpRequest, queryset: QuerySet[Saga]) -> list[Any] | None:
        """The selected sagas' ids, or None (with a message) when there is nothing to act on:
        a selection over the bulk limit, or ids of which none is a saga of the list (those not
        in it are named, as no longer matching its filters or as not found; the others go
        on)."""
        ids = _selected_ids(queryset)
        if len(ids) > MAX_BULK:
            messages.error(
                request,
                f"That selection holds more than {MAX_BULK} sagas. Narrow the list (for example "
                "by failure signature and state) and repeat; one action handles at most "
                f"{MAX_BULK} sagas.",
            )
            return None
        if not BooleanField().to_python(request.POST.get("select_across")):
            found = set(ids)
            missing = list(
                dict.fromkeys(
                    UUID(v)
                    for v in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
                    if UUID(v) not in found
                )
            )
            # The list posts to its filtered URL: a saga that changed meanwhile (a colleague
            # retried it out of needs_manual) is missing from the queryset, yet exists.
            exist = set(Saga.objects.filter(pk__in=missing).values_list("pk", flat=True))
            left = [i for i in missing if i in exist]
            gone = [i for i in missing if i not in exist]
            if left:
                n = len(left)
                shown = _shortlist(left)
                messages.error(
                    request,
                    f"No longer in this list ({shown}): {'it' if n == 1 else 'they'} changed "
                    "since the list was shown and no longer "
                    f"{'matches' if n == 1 else 'match'} its filters; nothing was done for "
                    f"{'it' if n == 1 else 'them'}. Reload the list.",
                )
            if gone:
                n = len(gone)
                shown = _shortlist(gone)
                messages.error(
                    request,
                    f"No such saga{'s' if n != 1 else ''} ({shown}): nothing was done for "
                    f"{'it' if n == 1 else 'them'}.",
                )
        return ids or None

    def _done(self, request: HttpRequest) -> HttpResponse | None:
        url = _next_url(request)
        return HttpResponseRedirect(url) if url else None

    @admin.action(description="Retry now", permissions=["operate"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        """Skip a backoff, or resume a saga that needs a person where it stopped."""
        ids = self._ids_or_refuse(request, queryset)
        if ids is None:
            return self._done(request)
        outcome = _Outcome()
        try:
            outcome.run(
                ids,
                lambda saga_id: saga_retry_now(
                    saga_id=saga_id,
                    user=request.user,
                    expected_version=_posted_version(request, saga_id),
                ),
            )
        except PermissionDenied as denied:
            messages.error(request, str(denied) or "You may not operate sagas.")
            return self._done(request)
        outcome.report(request, "Retry requested")
        return self._done(request)

    @admin.action(description="Compensate (undo what took effect)...", permissions=["operate"])
    def compensate(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        """First the plan and a reason field; on confirmation, compensate each saga."""
        ids = self._ids_or_refuse(request, queryset)
        if ids is None:
            return self._done(request)
        reason = trimmed(request.POST.get("reason", ""))
        error = ""
        if request.POST.get("confirm") == "yes" and len(reason) > NOTE_MAX:
            # The timeline keeps NOTE_MAX characters: a longer reason would be cut unseen.
            error = f"A reason may be at most {NOTE_MAX} characters; say it shorter."
        elif request.POST.get("confirm") == "yes":
            if reason:
                outcome = _Outcome()
                try:
                    outcome.run(
                        ids,
                        lambda saga_id: saga_compensate(
                            saga_id=saga_id,
                            user=request.user,
                            reason=reason,
                            expected_version=_posted_version(request, saga_id),
                        ),
                    )
                except PermissionDenied as denied:
                    messages.error(request, str(denied) or "You may not operate sagas.")
                    return self._done(request)
                outcome.report(request, "Compensation requested")
                return self._done(request)
            error = "Say why you compensate: the reason goes to the timeline with your name."
        return self._confirmation(request, queryset, ids, "compensate", reason, error)

    @admin.action(description="Resolve with a note...", permissions=["operate"])
    def resolve(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        """Close sagas that need a person, with a required note saying what was done."""
        ids = self._ids_or_refuse(request, queryset)
        if ids is None:
            return self._done(request)
        note = trimmed(request.POST.get("note", ""))
        # The confirmation page named the effects still in place; ticking the box accepts them.
        accept = request.POST.get("accept_effects") == "yes"
        error = ""
        if request.POST.get("confirm") == "yes" and len(note) > NOTE_MAX:
            error = f"A note may be at most {NOTE_MAX} characters (the API's limit too)."
        elif request.POST.get("confirm") == "yes":
            if note:
                outcome = _Outcome()
                try:
                    outcome.run(
                        ids,
                        lambda saga_id: saga_resolve(
                            saga_id=saga_id,
                            user=request.user,
                            note=note,
                            accept_effects=accept,
                            expected_version=_posted_version(request, saga_id),
                        ),
                    )
                except PermissionDenied as denied:
                    messages.error(request, str(denied) or "You may not operate sagas.")
                    return self._done(request)
                outcome.report(request, "Resolved")
                return self._done(request)
            error = "A note is required: say what you did, for whoever reads this saga next."
        return self._confirmation(request, queryset, ids, "resolve", note, error)

    @admin.action(description="Mark the failing undo done by hand...", permissions=["operate"])
    def undo_done(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        """A person did the undo a saga waits on (e.g. voided in the provider's dashboard):
        record it with a note, and the engine goes on with the rest of the undo by itself."""
        ids = self._ids_or_refuse(request, queryset)
        if ids is None:
            return self._done(request)
        note = trimmed(request.POST.get("note", ""))
        error = ""
        if request.POST.get("confirm") == "yes" and len(note) > NOTE_MAX:
            error = f"A note may be at most {NOTE_MAX} characters (the API's limit too)."
        elif request.POST.get("confirm") == "yes":
            if note:

                def undo_done(saga_id: Any) -> Any:
                    # The undo the confirmation page showed for this saga, and no other: a saga
                    # that moved on since is refused by the service (not_waiting_on_undo), and
                    # one the page named no undo for is refused here.
                    step = _posted_step(request, saga_id)
                    if not step:
                        raise SagaOperationRefused(
                            "no_step",
                            "The confirmation named no undo for this saga; reload and decide "
                            "again.",
                        )
                    return saga_undo_done(
                        saga_id=saga_id,
                        user=request.user,
                        step=step,
                        note=note,
                        expected_version=_posted_version(request, saga_id),
                    )

                outcome = _Outcome()
                try:
                    outcome.run(ids, undo_done)
                except PermissionDenied as denied:
                    messages.error(request, str(denied) or "You may not operate sagas.")
                    return self._done(request)
                outcome.report(
                    request, "Undo recorded as done by hand; the rest of the undo goes on"
                )
                return self._done(request)
            error = "A note is required: say how the undo was done (where, by whom, reference)."
        return self._confirmation(request, queryset, ids, "undo_done", note, error)

    def _confirmation(
        self,
        request: HttpRequest,
        queryset: QuerySet[Saga],
        ids: list[Any],
        operation: str,
        text: str,
        error: str,
    ) -> HttpResponse | None:
        sagas = list(
            Saga.objects.filter(pk__in=ids).prefetch_related(*_OWNERS).order_by("-created_at")
        )
        rows: list[dict[str, Any]] = []
        groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        # The sagas the page says will be acted on: the form posts back these and no others,
        # so a saga shown as refused is never acted on by confirming (whatever it became).
        accepted_ids: list[Any] = []
        # What each of them looked like on the page, posted back with it for every accepted
        # saga (listed or not): its version (see ``_posted_version``), and for undo done the
        # undo it waits on (see ``undo_done``).
        fences: list[tuple[Any, int, str]] = []
        for saga in sagas:
            refusal = _predicted_refusal(saga, operation)
            plan = []
            effects: list[str] = []
            if operation in ("compensate", "undo_done"):
                try:
                    plan = saga_compensation_plan(saga_id=saga.pk)
                except (LookupError, Saga.DoesNotExist, SagaOperationRefused):
                    plan = []  # its refusal, if any, is the row's (definition_missing)
                if operation == "undo_done":
                    # The first entry is the undo done by hand; the rest is what runs next.
                    plan = plan[1:]
            elif operation == "resolve" and not refusal:
                try:
                    effects = describe_effects(saga_effects_in_place(saga))
                except LookupError:
                    effects = []
            if not refusal:
                accepted_ids.append(saga.pk)
                fences.append((saga.pk, saga.version, saga.current_step))
                if operation == "compensate":
                    shape = tuple((p["step"], p["compensation"]) for p in plan)
                    group = groups.setdefault(shape, {"plan": plan, "sagas": []})
                    group["sagas"].append(saga)
            rows.append(
                {
                    "saga": saga,
                    "refusal": refusal,
                    "plan": plan,
                    "effects": effects,
                    "owner": self.owner_link(saga),
                    "step": self.step_column(saga),
                }
            )
        accepted = len(accepted_ids)
        if not accepted and not error:
            # Nothing here makes sense to do: say so at once instead of asking to confirm.
            refusals: dict[str, list[Any]] = {}
            for row in rows:
                refusals.setdefault(row["refusal"], []).append(row["saga"].pk)
            outcome = _Outcome()
            outcome.refused = {
                f"{detail[0].upper()}{detail[1:]}.": i for detail, i in refusals.items()
            }
            outcome.report(request, "")
            return self._done(request)
        single = sagas[0] if len(sagas) == 1 else None
        back = _next_url(request) or reverse("admin:sagas_saga_changelist")
        titles = {
            "compensate": ("Compensate this saga?", f"Compensate {len(sagas)} sagas?"),
            "resolve": ("Resolve this saga?", f"Resolve {len(sagas)} sagas?"),
            "undo_done": (
                "Mark this undo done by hand?",
                f"Mark the undo done by hand for {len(sagas)} sagas?",
            ),
        }
        context = {
            **self.admin_site.each_context(request),
            "title": titles[operation][0 if single else 1],
            "with_effects": sum(1 for row in rows if row["effects"]),
            "opts": self.opts,
            "operation": operation,
            "action": operation,
            "rows": rows[:MAX_LISTED],
            "more_rows": max(len(rows) - MAX_LISTED, 0),
            "groups": list(groups.values()),
            "single": single,
            "accepted": accepted,
            "refused": len(sagas) - accepted,
            "text": text,
            "error": error,
            "ids": accepted_ids,
            "fences_name": FENCES_FIELD,
            "fences": fences_field(fences),
            # The confirmation acts on exactly the sagas accepted here (ids posted back to the
            # unfiltered list), not on a filter re-evaluated a minute later.
            "post_url": reverse("admin:sagas_saga_changelist"),
            "next": _next_url(request) or "",
            "back_url": back,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        return TemplateResponse(request, f"admin/sagas/saga/{operation}_confirmation.html", context)


def _problem(saga: Saga, steps: list[SagaStep]) -> dict[str, Any] | None:
    """What went wrong, as one headline a newcomer can read, with the error that goes with it
    and the step it concerns (``None`` when nothing went wrong)."""
    current = next((s for s in steps if s.name == saga.current_step), None)
    error = saga.last_error

    def found(label: str, text: str, step: str, error: str, error_label: str = "Last error"):
        return {
            "label": label,
            "text": text,
            "step": step,
            "error": error,
            "error_label": error_label,
        }

    if saga.failed_undo:
        if saga.failed_step:
            code = f" with {saga.failure_code}" if saga.failure_code else ""
            because = f"; it was undoing because {saga.failed_step} failed{code}"
        elif saga.failure_code:
            because = f"; it was undoing because of {saga.failure_code}"
        else:
            because = ""
        return found(
            "Undo that kept failing",
            f"{_compensation_name(saga, saga.failed_undo)}, the compensation of "
            f"{saga.failed_undo}{because}",
            saga.failed_undo,
            error,
        )
    if saga.failed_step and saga_stopped_before_pivot(saga):
        return found(
            "Wait timed out",
            f"{saga.failed_step} got no answer in time, before the point of no return: "
            "send its signal to go on, or compensate to undo what the saga did",
            saga.failed_step,
            error,
        )
    if saga.failed_step and saga.state == SagaState.RESOLVED and saga.failure_code:
        # Resolving a saga that stopped before its pivot gives it up (see saga_resolve).
        return found(
            "Wait timed out",
            f"{saga.failed_step} got no answer in time; a person gave the saga up",
            saga.failed_step,
            error,
        )
    if saga.failed_step and saga.escalated_from == SagaState.RUNNING:
        if step_before_pivot(saga, saga.failed_step):
            # A wait that timed out and went to a person, who has acted since (sent its
            # signal, retried or compensated it): not past the point of no return.
            return found(
                "Wait timed out",
                f"{saga.failed_step} got no answer in time, before the point of no return; "
                "a person took it up (the timeline says how)",
                saga.failed_step,
                error,
            )
        return found(
            "Failed step",
            f"{saga.failed_step}, after the point of no return (nothing before it can be undone)",
            saga.failed_step,
            error,
        )
    if saga.state == SagaState.RUNNING and saga.cancel_reason:
        return found(
            "Stopping",
            f"cancel requested ({saga.cancel_reason}): the saga stops at its next step boundary "
            "and undoes what took effect",
            saga.current_step,
            error,
            "Last error before that",
        )
    if saga.state == SagaState.RUNNING and current and current.status == StepStatus.RETRYING:
        return found(
            "Failing step",
            f"{current.name} (attempt {saga.attempt}, still being retried)",
            current.name,
            current.last_error or error,
        )
    if (
        saga.state == SagaState.COMPENSATING
        and current
        and current.status == StepStatus.COMPENSATING
    ):
        return found(
            "Failing undo",
            f"the compensation of {current.name} (attempt {saga.attempt}, still being retried)",
            current.name,
            current.last_error or error,
        )
    where = f" at {saga.failed_step}" if saga.failed_step else ""
    if saga.state == SagaState.COMPENSATING:
        return found(
            "Undoing because of",
            f"{saga.failure_code or saga.cancel_reason}{where}",
            saga.failed_step,
            error,
            "Last error before that",
        )
    if saga.failed_step:
        reason = f", reason: {saga.failure_code}" if saga.failure_code else ""
        return found("Failed step", f"{saga.failed_step}{reason}", saga.failed_step, error)
    if saga.failure_code:
        help_text = REASON_HELP.get(saga.failure_code)
        text = f"{saga.failure_code} ({help_text})" if help_text else saga.failure_code
        return found("Stopped because", text, "", error, "Last error before that")
    return None


def _compensation_name(saga: Saga, step: str) -> str:
    """The compensation function of ``step`` (``void_authorization``), as the plan names it."""
    try:
        definition = definition_of(saga)
        compensate = definition.steps[definition.index_of(step)].compensate
    except (LookupError, KeyError):
        return "the undo"
    if compensate is None:
        return "-"
    return getattr(compensate, "__name__", "the undo")


def _version_rows(changelist: str) -> list[dict[str, Any]]:
    """Unfinished sagas per type and definition version, with what this code says of each: so
    an operator sees when an old version has drained and which sagas no worker here can run."""
    counts: dict[tuple[str, int], int] = {}
    problems: dict[tuple[str, int], str] = {}
    for c in selectors.unsettled_versions():
        key = (c.saga_type, c.version)
        counts[key] = counts.get(key, 0) + c.count
        problem = definition_problem(c.saga_type, c.version, c.fingerprint)
        if problem:
            problems[key] = problem
    for definition in registered_definitions():
        counts.setdefault((definition.saga_type, definition.version), 0)
    rows = []
    for (saga_type, version), count in sorted(counts.items()):
        newest = registered_versions(saga_type)[-1:] == [version]
        problem = problems.get((saga_type, version), "")
        if problem:
            status = f"waiting for its definition: {problem}"
        elif newest:
            status = "newest: new sagas start here"
        elif count:
            status = "older: draining (or move them with saga_migrate)"
        else:
            status = "older: drained, can be removed from the code"
        rows.append(
            {
                "saga_type": saga_type,
                "version": version,
                "count": count,
                "status": status,
                "alert": bool(problem),
                "url": f"{changelist}?saga_type={saga_type}&definition_version={version}"
                "&finished=no",
            }
        )
    return rows


def _stuck_help() -> str:
    return (
        f"No progress for over {settings.SAGA_STUCK_AFTER:g}s and no worker holds it. The sweeper "
        f"(every {settings.SAGA_SWEEP_INTERVAL:g}s) sends it to a worker again; if it stays stuck, "
        "read the failing step and its error, then retry now or compensate."
    )


def _sweep_task_url() -> str | None:
    from django_celery_beat.models import PeriodicTask

    from sagas.apps import SWEEP_TASK_NAME

    task = PeriodicTask.objects.filter(name=SWEEP_TASK_NAME).only("pk").first()
    return admin_url(task) if task else None


def _provider_breakers(request: HttpRequest) -> dict[str, Any]:
    """The dashboard's providers table: each breaker, its health, and who may force it."""
    from providers.admin import can_force
    from providers.selectors import breaker_overview
    from sagas.metrics import parked_by_provider

    return {
        "breakers": breaker_overview(parked=parked_by_provider()),
        "can_force_breakers": can_force(request),
        "breaker_actions_url": reverse("admin:audit_auditentry_changelist")
        + "?action__startswith=breaker.",
    }
