"""Writing the audit log. Any app may call :func:`audit_record`; this app imports none of them."""

from __future__ import annotations

from typing import Any

import structlog
from django.http import HttpRequest

from audit.context import client_ip, current_origin, source_of
from audit.models import AuditEntry

log = structlog.get_logger(__name__)


def audit_record(
    action: str,
    *,
    actor: Any = None,
    actor_name: str = "",
    target: str = "",
    detail: dict[str, Any] | None = None,
    request: HttpRequest | None = None,
    source: str = "",
) -> AuditEntry:
    """Record that ``actor`` did ``action`` to ``target``, and log it.

    The address and channel come from ``request`` when given, else from the request being
    served (:class:`audit.context.AuditContextMiddleware`), else it is a command (``cli``).
    Runs inside the caller's transaction, so an action that rolls back leaves no entry.
    """
    if request is not None:
        ip, channel = client_ip(request), source_of(request)
    else:
        origin = current_origin()
        ip, channel = origin.ip, origin.source
    user = actor if getattr(actor, "pk", None) is not None else None
    name = actor_name or (actor.get_username() if user is not None else "") or "system"
    entry = AuditEntry.objects.create(
        actor=user,
        actor_name=name[:150],
        action=action[:64],
        target=target[:200],
        detail=detail or {},
        ip=ip,
        source=(source or channel)[:16],
    )
    log.info(
        "audit",
        action=action,
        actor=name,
        target=target,
        ip=ip,
        source=entry.source,
        **{f"detail_{k}": v for k, v in (detail or {}).items()},
    )
    return entry
