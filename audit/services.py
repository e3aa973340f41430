"""Writing the audit log. Any app may call :func:`audit_record`; this app imports none of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from django.db.models import Model
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
    served (:class:`audit.context.AuditContextMiddleware`), else it is a command (``cli``);
    with no actor given, the actor is that request's signed-in user, if any.
    Runs inside the caller's transaction, so an action that rolls back leaves no entry.
    """
    if request is not None:
        ip, channel = client_ip(request), source_of(request)
    else:
        origin = current_origin()
        ip, channel = origin.ip, origin.source
        if actor is None and not actor_name:
            actor = origin.user()
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


def audit_object_change(
    verb: str,
    obj: Model,
    *,
    actor: Any,
    fields: Sequence[str] = (),
    message: str = "",
    request: HttpRequest | None = None,
) -> AuditEntry:
    """Record that ``actor`` ``verb`` (added, changed, deleted) ``obj``: an ``object.<verb>``
    entry whose target is ``app.model:pk`` and whose detail names the model, the object as it
    reads and the fields that changed, the same shape from the ops console and the API."""
    opts = obj._meta
    return audit_record(
        f"object.{verb}",
        actor=actor,
        target=f"{opts.label_lower}:{obj.pk}",
        detail={
            "model": opts.label_lower,
            "object_id": str(obj.pk),
            "object": str(obj)[:200],
            "fields": list(fields),
            "message": message,
        },
        request=request,
    )
