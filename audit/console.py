"""Every staff edit in the ops console goes to the audit log, for every model registered there.

Django's admin already writes a ``LogEntry`` for each add, change and delete (who and when, and
the change message), but not where the request came from, and nothing for other admin actions
(django-celery-beat's "Disable selected tasks", say). The console's site is
:class:`AuditedAdminSite` (``audit.admin_app.AuditedAdminConfig`` installs it in place of
Django's), and it gives every ``ModelAdmin`` registered on it :class:`AuditedAdminMixin`:
Django's own User and Group admins, django-celery-beat's, the project's, all through one place.
The mixin hooks the admin's own logging points (``log_addition``, ``log_change``,
``log_deletions``, which "delete selected" calls too), so each edit is one audit entry with the
same address logic as every other entry (``audit.context.client_ip``).

Actions that write their own audit entry (saga ops, forcing a breaker, webhook and token
actions) are named in the admin's ``audited_actions`` and are not recorded a second time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.admin.models import LogEntry
from django.core.validators import MaxLengthValidator
from django.db.models import Model
from django.http import HttpRequest

from audit.services import audit_object_change, audit_record

#: How many object ids a console action's entry lists (the count is always there).
MAX_IDS = 100


def changed_fields(message: Any) -> list[str]:
    """The object's own fields that a change message names (as the admin shows them)."""
    if not isinstance(message, list):
        return []
    fields: list[str] = []
    for part in message:
        changed = part.get("changed") if isinstance(part, dict) else None
        if changed and "object" not in changed:  # an inline's change names its object
            fields.extend(str(f) for f in changed.get("fields", []))
    return fields


def readable(message: Any) -> str:
    """The change message as the admin's history page shows it."""
    text = message if isinstance(message, str) else json.dumps(message)
    return LogEntry(change_message=text).get_change_message()


class AuditedAdminMixin:
    """Records the admin's adds, changes, deletes and actions in the audit log.

    The site puts it in front of each admin class, so an admin that changes what is recorded
    (overrides :meth:`audit_edit`) names it among its own bases; the site then leaves it as it
    is. An admin's ``audited_actions`` (a set of action names) are actions that write their
    own audit entries.
    """

    def log_addition(self, request: HttpRequest, obj: Model, message: Any) -> Any:
        entry = super().log_addition(request, obj, message)  # type: ignore[misc]
        self.audit_edit(request, "added", [obj], message)
        return entry

    def log_change(self, request: HttpRequest, obj: Model, message: Any) -> Any:
        entry = super().log_change(request, obj, message)  # type: ignore[misc]
        self.audit_edit(request, "changed", [obj], message)
        return entry

    def log_deletions(self, request: HttpRequest, queryset: Iterable[Model]) -> Any:
        entries = super().log_deletions(request, queryset)  # type: ignore[misc]
        self.audit_edit(request, "deleted", queryset, "")
        return entries

    def audit_edit(
        self, request: HttpRequest, verb: str, objects: Iterable[Model], message: Any
    ) -> None:
        """One entry per object; an admin whose deletes write their own entries overrides it."""
        text = readable(message) if message else verb.capitalize() + "."
        for obj in objects:
            audit_object_change(
                verb,
                obj,
                actor=request.user,
                fields=changed_fields(message),
                message=text,
                request=request,
            )

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)  # type: ignore[misc]
        # "delete selected" is recorded by log_deletions, like a delete from the object's page.
        skip = {"delete_selected", *getattr(self, "audited_actions", ())}
        for name, (func, action_name, description) in list(actions.items()):
            if name not in skip:
                actions[name] = (_audited(func, name), action_name, description)
        return actions


def _audited(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``func`` (an admin action), writing an entry for the objects it was applied to once it
    has run (an action refused with an exception leaves none)."""

    def action(model_admin: admin.ModelAdmin, request: HttpRequest, queryset: Any) -> Any:
        ids = [str(pk) for pk in queryset.values_list("pk", flat=True)[: MAX_IDS + 1]]
        response = func(model_admin, request, queryset)
        opts = model_admin.model._meta
        audit_record(
            "console.action",
            actor=request.user,
            target=opts.label_lower,
            detail={
                "model": opts.label_lower,
                "action": name,
                "objects": ids[:MAX_IDS],
                "more": len(ids) > MAX_IDS,
            },
            request=request,
        )
        return response

    action.__name__ = getattr(func, "__name__", name)
    return action


def audited(admin_class: type[admin.ModelAdmin]) -> type[admin.ModelAdmin]:
    """``admin_class`` with :class:`AuditedAdminMixin` in front (itself if it has it)."""
    if issubclass(admin_class, AuditedAdminMixin):
        return admin_class
    return type(
        admin_class.__name__,
        (AuditedAdminMixin, admin_class),
        {"__module__": admin_class.__module__, "__doc__": admin_class.__doc__},
    )


class ConsoleLoginForm(AdminAuthenticationForm):
    """The admin's login form, with the user name's length checked before anyone is asked.

    Django's form only tells the browser the length (``maxlength``); the server took any
    length, and django-axes then recorded the failed attempt under a name longer than its
    column (255): the login page was a ``500``. A name longer than any user can have is a
    form error instead, and asks no backend.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["username"]
        assert isinstance(field, forms.CharField)  # Django's UsernameField
        if field.max_length is not None:
            field.validators.append(MaxLengthValidator(field.max_length))


class AuditedAdminSite(admin.AdminSite):
    """The ops console's site: every admin registered on it records its edits."""

    login_form = ConsoleLoginForm

    def register(
        self,
        model_or_iterable: Any,
        admin_class: type[admin.ModelAdmin] | None = None,
        **options: Any,
    ) -> None:
        super().register(model_or_iterable, audited(admin_class or admin.ModelAdmin), **options)
