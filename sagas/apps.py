from django.apps import AppConfig
from django.db.models.signals import post_migrate


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from importlib import import_module

        from django.conf import settings

        for module in settings.SAGA_DEFINITION_MODULES:
            import_module(module)
        import_module("sagas.audit_hooks")
        import_module("sagas.checks")  # registers the deploy check
        # The doorbell sends the run task by name: register it in every process that rings.
        import_module("sagas.tasks")
        post_migrate.connect(_ensure_sweep_schedule, sender=self)
        # A provider's breaker closing brings the sagas parked on it back at once.
        from providers.breaker import breaker_closed
        from sagas.sweeper import wake_parked_on_close

        breaker_closed.connect(wake_parked_on_close, dispatch_uid="sagas.wake_parked_on_close")
        # Prepared statements outlive a migration that changes a column's type: see
        # config.db.replan_after_schema_change.
        from django.db.backends.signals import connection_created

        from config.db import install_compiled_tz_loader, install_replan

        connection_created.connect(install_replan, dispatch_uid="config.db.install_replan")
        # Timestamps load in psycopg's compiled code, not Django's Python loader.
        connection_created.connect(
            install_compiled_tz_loader, dispatch_uid="config.db.install_compiled_tz_loader"
        )


SWEEP_TASK_NAME = "sagas: sweep stuck sagas"


def _ensure_sweep_schedule(**_kwargs) -> None:
    """Create the sweeper's periodic task once; after that it belongs to the ops console, unless
    ``SAGA_SWEEP_INTERVAL`` is set, which every migrate applies."""
    from django.conf import settings
    from django_celery_beat.models import IntervalSchedule

    from config.periodic import ensure_periodic_task

    seconds = float(settings.SAGA_SWEEP_INTERVAL)
    if seconds == int(seconds):
        every, period = int(seconds), IntervalSchedule.SECONDS
    else:
        every, period = int(seconds * 1_000_000), IntervalSchedule.MICROSECONDS
    ensure_periodic_task(
        SWEEP_TASK_NAME,
        "sagas.sweep",
        every,
        period,
        "Re-rings overdue sagas whose lease expired and times out late ones.",
        apply_interval=settings.SAGA_SWEEP_INTERVAL_SET,
    )
