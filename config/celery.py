"""The Celery application.

``celery -A config worker`` and ``celery -A config beat`` find it here. Every setting lives in
Django settings under the ``CELERY_`` namespace, so there is one place to read configuration.
"""

import os

from celery import Celery
from celery.signals import worker_process_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("sagarunner")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _validate_faults_at_start(**_kwargs) -> None:
    """Parse ``SAGA_FAULTS`` once in the parent so a malformed value stops the worker early."""
    from sagas.faults import load_faults_or_exit

    load_faults_or_exit()


@worker_process_init.connect
def _reset_db_connections(**_kwargs) -> None:
    """A forked child must not share the parent's database socket."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.inc_thread_sharing()
        conn.close()
