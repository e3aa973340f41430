"""Ops actions on sagas go to the audit log too (the saga's timeline already has them).

A receiver, so the services that write the timeline stay as they are: every ``ops_*`` event,
from the ops console or the API, becomes an audit entry with the operator, the saga and the
address the request came from (:func:`sagas.services.audit_ops_events`, which
``saga_migrate --apply`` calls itself: its events are bulk-created and send no ``post_save``).
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_save
from django.dispatch import receiver

from sagas.models import SagaEvent
from sagas.services import audit_ops_events


@receiver(post_save, sender=SagaEvent, dispatch_uid="sagas.audit_ops_events")
def audit_ops_event(sender: type, instance: SagaEvent, created: bool, **_kwargs: Any) -> None:
    if created:
        audit_ops_events([instance])
