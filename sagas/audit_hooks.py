"""Ops actions on sagas go to the audit log too (the saga's timeline already has them).

A receiver, so the services that write the timeline stay as they are: every ``ops_*`` event,
from the ops console or the API, becomes an audit entry with the operator, the saga and the
address the request came from.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_save
from django.dispatch import receiver

from audit.services import audit_record
from sagas.models import SagaEvent


@receiver(post_save, sender=SagaEvent, dispatch_uid="sagas.audit_ops_events")
def audit_ops_event(sender: type, instance: SagaEvent, created: bool, **_kwargs: Any) -> None:
    if not created or not instance.kind.startswith("ops_"):
        return
    name = instance.actor.removeprefix("user:")
    user = get_user_model().objects.filter(username=name).first() if name != "system" else None
    audit_record(
        f"saga.{instance.kind.removeprefix('ops_')}",
        actor=user,
        actor_name=name,
        target=f"saga:{instance.saga_id}",
        detail={"step": instance.step, "note": instance.detail[:500]},
    )
