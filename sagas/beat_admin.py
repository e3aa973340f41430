"""The ops console's form for periodic tasks (django-celery-beat's), with its JSON fields
checked for the shape beat reads, not only for being JSON.

django-celery-beat's form asks only that ``args``, ``kwargs`` and ``headers`` parse. Beat then
reads ``headers`` as an object (it adds the task's name to it), ``kwargs`` as an object and
``args`` as a list: saved as ``[]`` in the console, the headers made beat fail on every start,
and with it the whole stack under ``make run``, until someone mended the row in SQL. The demo
staff user may edit the sweeper's interval, so this form is within reach of support staff.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django_celery_beat.admin import PeriodicTaskAdmin, PeriodicTaskForm
from django_celery_beat.models import PeriodicTask

_SHAPES: dict[str, tuple[type, str]] = {
    "args": (list, "a JSON list, e.g. []"),
    "kwargs": (dict, "a JSON object, e.g. {}"),
    "headers": (dict, "a JSON object, e.g. {}"),
}


class CheckedPeriodicTaskForm(PeriodicTaskForm):
    def _checked(self, field: str) -> Any:
        value = self.cleaned_data[field]
        if not value or not value.strip():
            return value  # empty: beat takes the default
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise forms.ValidationError(f"Not JSON: {exc}.") from None
        kind, shape = _SHAPES[field]
        if not isinstance(parsed, kind):
            raise forms.ValidationError(f"Must be {shape}.")
        return value

    def clean_args(self) -> Any:
        return self._checked("args")

    def clean_kwargs(self) -> Any:
        return self._checked("kwargs")

    def clean_headers(self) -> Any:
        return self._checked("headers")


class CheckedPeriodicTaskAdmin(PeriodicTaskAdmin):
    form = CheckedPeriodicTaskForm


if admin.site.is_registered(PeriodicTask):
    admin.site.unregister(PeriodicTask)
admin.site.register(PeriodicTask, CheckedPeriodicTaskAdmin)
