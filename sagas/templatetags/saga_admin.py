"""Template tags of the ops console.

``saga_date_hierarchy`` replaces the admin's ``date_hierarchy`` tag on big tables. Django's tag
lists the years, months or days that hold rows with ``SELECT DISTINCT date_trunc(...)`` over
the whole (filtered) table, a scan of every row on every page load. This one reads only the
first and last date of the table (two index lookups) and offers every year, month or day
between them.
"""

from __future__ import annotations

import calendar
import datetime
import json

from django import template
from django.contrib.admin.templatetags.base import InclusionAdminNode
from django.db import models
from django.utils import formats, timezone
from django.utils.text import capfirst

from sagas import selectors
from sagas.models import Saga, SagaState

register = template.Library()


def _date_hierarchy(cl):
    field_name = cl.date_hierarchy
    year_field, month_field, day_field = (f"{field_name}__{p}" for p in ("year", "month", "day"))
    year = cl.params.get(year_field)
    month = cl.params.get(month_field)
    day = cl.params.get(day_field)

    def link(filters):
        return cl.get_query_string(filters, [f"{field_name}__"])

    if year and month and day:
        date = datetime.date(int(year), int(month), int(day))
        return {
            "show": True,
            "back": {
                "link": link({year_field: year, month_field: month}),
                "title": capfirst(formats.date_format(date, "YEAR_MONTH_FORMAT")),
            },
            "choices": [{"title": capfirst(formats.date_format(date, "MONTH_DAY_FORMAT"))}],
        }

    # The span of the whole table (two index endpoint reads), not of the filtered rows: a
    # filter such as "stuck" would otherwise read every matching row to find its first date.
    span = cl.root_queryset.aggregate(first=models.Min(field_name), last=models.Max(field_name))
    if not (span["first"] and span["last"]):
        return {"show": False}
    first, last = (timezone.localtime(span[k]).date() for k in ("first", "last"))
    if not year and first.year == last.year:
        year = first.year
        if first.month == last.month:
            month = first.month

    if year and month:
        year, month = int(year), int(month)
        days = [
            datetime.date(year, month, d)
            for d in range(1, calendar.monthrange(year, month)[1] + 1)
            if first <= datetime.date(year, month, d) <= last
        ]
        return {
            "show": True,
            "back": {"link": link({year_field: year}), "title": str(year)},
            "choices": [
                {
                    "link": link({year_field: year, month_field: month, day_field: d.day}),
                    "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT")),
                }
                for d in days
            ],
        }
    if year:
        year = int(year)
        months = [
            datetime.date(year, m, 1)
            for m in range(1, 13)
            if (first.year, first.month) <= (year, m) <= (last.year, last.month)
        ]
        return {
            "show": True,
            "back": {"link": link({}), "title": "All dates"},
            "choices": [
                {
                    "link": link({year_field: year, month_field: m.month}),
                    "title": capfirst(formats.date_format(m, "YEAR_MONTH_FORMAT")),
                }
                for m in months
            ],
        }
    return {
        "show": True,
        "back": None,
        "choices": [
            {"link": link({year_field: str(y)}), "title": str(y)}
            for y in range(first.year, last.year + 1)
        ],
    }


@register.tag(name="saga_date_hierarchy")
def saga_date_hierarchy_tag(parser, token):
    # Django 5.2's InclusionAdminNode takes (parser, token, func, template_name, ...); the stubs
    # add a leading name argument it does not have.
    return InclusionAdminNode(  # type: ignore[call-arg]
        parser,
        token,
        func=_date_hierarchy,
        template_name="date_hierarchy.html",
        takes_context=False,
    )


@register.simple_tag(takes_context=True)
def saga_overview(context):
    """The numbers support staff check first, for the admin index (bounded reads)."""
    request = context.get("request")
    if request is None or not request.user.has_perm("sagas.view_saga"):
        return None
    from django.urls import reverse

    changelist = reverse("admin:sagas_saga_changelist")
    return {
        "needs_manual": selectors.saga_count_bounded(
            Saga.objects.filter(state=SagaState.NEEDS_MANUAL), cap=10_000
        ),
        "needs_manual_url": f"{changelist}?state__exact={SagaState.NEEDS_MANUAL}",
        "stuck": selectors.saga_count_bounded(
            Saga.objects.filter(selectors.saga_stuck_q()), cap=10_000
        ),
        "stuck_url": f"{changelist}?stuck=yes",
        "staff_waits": selectors.saga_count_bounded(
            Saga.objects.filter(selectors.saga_waiting_for_staff_q()), cap=10_000
        ),
        "staff_waits_url": f"{changelist}?waiting_for={selectors.STAFF_WAITS}",
        "dashboard_url": reverse("admin:sagas_saga_dashboard"),
        "changelist_url": changelist,
    }


@register.filter
def approx(count) -> str:
    """``1,234`` for an exact count, ``about 1,234,000`` for an estimate."""
    value = f"{count.value:,}"
    return value if count.exact else f"about {value}"


@register.filter
def as_json(value) -> str:
    """A step's JSON result as JSON (not as a Python repr)."""
    return json.dumps(value, sort_keys=True, default=str)
