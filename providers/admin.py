"""The providers' breakers in the ops console: see them, and force them open or closed.

Forcing is for people on call: ``force open`` stops traffic to a provider you know is down
before its failure rate shows it (held until force-closed, no canaries); ``force close`` resumes
it now, counting health afresh. Both need the ``ops`` permission and land in the audit log
(``breaker.force_open`` / ``breaker.force_closed``) with the user and address.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.http import url_has_allowed_host_and_scheme

from providers import breaker
from providers.models import Breaker, BreakerState

#: The ops group's permission (the one that retries and compensates sagas).
OPS_PERMISSION = "sagas.operate_saga"


def can_force(request: HttpRequest) -> bool:
    return request.user.has_perm(OPS_PERMISSION)


@admin.register(Breaker)
class BreakerAdmin(admin.ModelAdmin):
    list_display = ("provider", "state", "since", "probe_at", "forced", "generation")
    readonly_fields = list_display
    actions = ["force_open", "force_close"]
    audited_actions = frozenset(actions)  # breaker.force writes the audit entry

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Breaker | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Breaker | None = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return can_force(request)

    @admin.action(description="Force open (hold until force-closed)", permissions=["operate"])
    def force_open(self, request: HttpRequest, queryset) -> None:
        for provider in queryset.values_list("provider", flat=True):
            breaker.force(provider, BreakerState.OPEN, user=request.user, request=request)
        messages.success(request, "Forced open.")

    @admin.action(description="Force close", permissions=["operate"])
    def force_close(self, request: HttpRequest, queryset) -> None:
        for provider in queryset.values_list("provider", flat=True):
            breaker.force(provider, BreakerState.CLOSED, user=request.user, request=request)
        messages.success(request, "Forced closed.")

    def get_urls(self):
        force = path(
            "<str:provider>/force/<str:to>/",
            self.admin_site.admin_view(self.force_view),
            name="providers_breaker_force",
        )
        return [force, *super().get_urls()]

    def force_view(self, request: HttpRequest, provider: str, to: str) -> HttpResponse:
        """The dashboard's force buttons (POST only), back to where they were pressed."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not can_force(request):
            raise PermissionDenied
        known = provider in (settings.SAGA_PROVIDERS or {}) or (
            Breaker.objects.filter(provider=provider).exists()
        )
        if to not in (BreakerState.OPEN, BreakerState.CLOSED):
            messages.error(request, f"A breaker can be forced open or closed, not {to!r}.")
        elif not known:
            # A name from the address, not from a button: forcing it would make up a breaker
            # (and a metric series an alert may watch) for a provider nothing calls.
            messages.error(request, f"No provider {provider[:64]!r} has a breaker.")
        else:
            old = breaker.force(provider, to, user=request.user, request=request)
            messages.success(request, f"Breaker of {provider}: {old} -> forced {to}.")
        back = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(back, {request.get_host()}):
            back = self._landing(request)
        return HttpResponseRedirect(back)

    def _landing(self, request: HttpRequest) -> str:
        """Where a force without a usable ``next`` goes: a page this user may open, with the
        message. The breakers' own list needs its view permission, which ops staff need not
        have (the demo staff user has not): sent there, they saw only "403 Forbidden". The saga
        dashboard is named by its permission, not its model: providers sits below the engine."""
        if request.user.has_perm("sagas.view_saga") or request.user.has_perm("sagas.change_saga"):
            return reverse("admin:sagas_saga_dashboard")  # where the buttons are
        if self.has_view_permission(request):
            return reverse("admin:providers_breaker_changelist")
        return reverse("admin:index")
