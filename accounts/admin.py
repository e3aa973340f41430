"""API tokens in the ops console: staff see every token (never the token itself: only its
digest is stored) and revoke any of them. Revoking is deleting, and goes to the audit log.
The token list takes no URL lookup on a token's columns (``?token_key__startswith=`` would
read the 15 characters of the token knox keeps in clear, where the console shows 8); nor
does django-axes' login log on its session digests. Nor does any address of the console carry
a token's digest: the list is the tokens' only page (:meth:`AuthTokenAdmin.get_urls`).

Login lockouts (django-axes' attempts) are re-registered only so that deleting one in the
console is recorded once: an active lockout as ``login.unlocked`` (:mod:`accounts.lockout`),
anything else as the console's usual ``object.deleted``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from axes.admin import AccessAttemptAdmin as AxesAccessAttemptAdmin
from axes.admin import AccessLogAdmin as AxesAccessLogAdmin
from axes.models import AccessAttempt, AccessLog
from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.urls import URLPattern
from django.utils import timezone
from knox.models import AuthToken

from accounts.lockout import attempt_pair, lifted_by
from accounts.tokens import token_label, token_revoke
from audit.console import AuditedAdminMixin
from config.admin import FilterLookupsOnly

admin.site.unregister(AuthToken)
admin.site.unregister(AccessAttempt)
admin.site.unregister(AccessLog)


@admin.register(AuthToken)
class AuthTokenAdmin(AuditedAdminMixin, FilterLookupsOnly, admin.ModelAdmin):
    list_display = ["label", "user", "created", "expiry", "expired"]
    list_select_related = ["user"]
    list_display_links = None  # a token has no page of its own (get_urls)
    search_fields = ["=user__username"]
    ordering = ["-created"]
    actions = ["revoke"]
    audited_actions = frozenset(actions)  # token_revoke writes a token.revoked entry each

    @admin.display(description="token")
    def label(self, obj: AuthToken) -> str:
        return f"{token_label(obj)}..."

    @admin.display(boolean=True)
    def expired(self, obj: AuthToken) -> bool:
        return obj.expiry is not None and obj.expiry < timezone.now()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # issued by `manage.py issue_token`, shown once

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        """The list only: no page of one token (view, delete, history).

        knox keys a token's row by its digest, so a token's pages had it in their addresses
        (``/admin/knox/authtoken/<digest>/change/``), and from there in browser history, the
        web and proxy access logs and any ``Referer``. A digest is not the token, but it is
        the stored credential's lookup key, and it had no business outside the database. The
        pages showed nothing the list does not (the token's first characters, owner, creation
        and expiry) and did nothing "Revoke selected tokens" does not, which posts its choice
        in the request's body. A page keyed otherwise would need a key knox does not have (a
        swapped token model, a migration of every token and of the staff's permissions) for no
        more than the list shows.
        """
        changelist = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [url for url in super().get_urls() if getattr(url, "name", None) == changelist]

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # "revoke" does it, with an audit entry each
        return actions

    @admin.action(description="Revoke selected tokens", permissions=["delete"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[AuthToken]) -> None:
        tokens = list(queryset.select_related("user"))
        for token in tokens:
            token_revoke(token=token, actor=request.user, reason="revoked in the ops console")
        self.message_user(request, f"Revoked {len(tokens)} token(s).")


@admin.register(AccessAttempt)
class AccessAttemptAdmin(AuditedAdminMixin, AxesAccessAttemptAdmin):
    """Deleting attempts here is recorded once each: as ``login.unlocked`` when the delete
    lifted a lockout (``accounts.lockout``), else as a deletion.

    Which it was is known only after the delete (another row of the same user name or
    address may keep it locked), while Django logs deletions before it; so the deletions are
    held back until the delete has run.
    """

    def audit_edit(
        self, request: HttpRequest, verb: str, objects: Iterable[Model], message: Any
    ) -> None:
        if verb == "deleted":
            # Copies: deleting an instance sets its primary key to None, and the entry names it.
            held = [(copy.copy(a), attempt_pair(a)) for a in objects]
            request._attempts_deleted = held  # type: ignore[attr-defined]
            return
        super().audit_edit(request, verb, objects, message)

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        super().delete_model(request, obj)
        self._audit_deleted(request, lifted_by(obj))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        super().delete_queryset(request, queryset)
        self._audit_deleted(request, lifted_by(queryset))

    def _audit_deleted(self, request: HttpRequest, lifted: set[tuple[str, str]]) -> None:
        held = getattr(request, "_attempts_deleted", [])
        request._attempts_deleted = []  # type: ignore[attr-defined]
        rows = [attempt for attempt, pair in held if pair not in lifted]
        super().audit_edit(request, "deleted", rows, "")


@admin.register(AccessLog)
class AccessLogAdmin(FilterLookupsOnly, AxesAccessLogAdmin):
    """django-axes' log of logins, filtered only as its own filters do: each row holds a
    digest of the session's key (``session_hash``), which the page does not show."""
