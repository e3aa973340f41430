"""Login lockouts go to the audit log.

django-axes signals ``user_locked_out`` when a user or address is locked, and again on every
attempt while it stays locked; the audit log gets one entry per lockout (repeats within the
cool-off are left to axes' own access log). Deleting a still-active lockout (the unlock commands
``axes_reset*``, or the ops console) is a ``login.unlocked`` entry.
"""

from __future__ import annotations

from typing import Any

from axes.models import AccessAttempt
from axes.signals import user_locked_out
from django.conf import settings
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone

from audit.models import AuditEntry
from audit.services import audit_record


@receiver(user_locked_out, dispatch_uid="accounts.audit_lockout")
def audit_lockout(sender: Any, request: Any, username: str, ip_address: str, **_kw: Any) -> None:
    target = f"user:{username}" if username else f"ip:{ip_address}"
    since = timezone.now() - settings.AXES_COOLOFF_TIME
    if AuditEntry.objects.filter(action="login.locked_out", target=target, at__gte=since).exists():
        return
    audit_record(
        "login.locked_out",
        actor_name=username or "anonymous",
        target=target,
        detail={"failures": settings.AXES_FAILURE_LIMIT, "path": request.path if request else ""},
        request=request,
        source="login",
    )


def is_active_lockout(attempt: AccessAttempt) -> bool:
    """Whether ``attempt`` locks its user or address out now (deleting it is an unlock)."""
    locked = attempt.failures_since_start >= settings.AXES_FAILURE_LIMIT
    return locked and attempt.attempt_time > timezone.now() - settings.AXES_COOLOFF_TIME


@receiver(post_delete, sender=AccessAttempt, dispatch_uid="accounts.audit_unlock")
def audit_unlock(sender: type, instance: AccessAttempt, **_kw: Any) -> None:
    if not is_active_lockout(instance):
        return  # an expired lockout or a few failures being forgotten: nothing to record
    audit_record(
        "login.unlocked",
        target=f"user:{instance.username}" if instance.username else "",
        detail={"locked_address": instance.ip_address, "failures": instance.failures_since_start},
    )
