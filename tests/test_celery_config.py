"""The Celery app reads the CELERY_* Django settings, under Celery's own names."""

from __future__ import annotations

from django.conf import settings

from config.celery import app


def test_celery_settings_arrive_under_celerys_names():
    """What the settings ask of Celery (acks late, prefetch 1, JSON...) is what it runs with."""
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_default_queue == settings.CELERY_TASK_DEFAULT_QUEUE
    assert conf.broker_url == settings.CELERY_BROKER_URL
    assert conf.beat_scheduler == "django_celery_beat.schedulers:DatabaseScheduler"
    assert "config.tasks" in conf.imports
    assert "sagas.run" in conf.task_annotations


def test_a_worker_starts_without_deprecation_warnings():
    """A worker calls this at start and prints a CDeprecationWarning per Celery 3 name it
    thinks it sees (CELERY_TIMEZONE and five more, when handed over with their prefix)."""
    assert not app.conf.maybe_warn_deprecated_settings()
