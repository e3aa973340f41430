"""Diagnostic tasks of the project shell.

``config.ping_db`` proves, end to end, that a message sent through the configured broker is
executed by a worker that can write to the configured database: the test harness and the
embedded-default test use it, and an operator can send it by hand
(``celery -A config call config.ping_db --args '["probe-1"]'``). It only ever touches an
``auth.Group`` named by the caller.
"""

from celery import shared_task


@shared_task(name="config.ping_db")
def ping_db(marker: str) -> int:
    """Create (idempotently) a group named ``marker``; return its id."""
    from django.contrib.auth.models import Group

    group, _ = Group.objects.get_or_create(name=marker)
    return group.pk
