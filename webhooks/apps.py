from django.apps import AppConfig
from django.db.models.signals import post_migrate


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Webhooks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from importlib import import_module

        # Delivery rings by the task's name: register the tasks in every process that rings.
        import_module("webhooks.tasks")
        import_module("webhooks.checks")  # registers the system checks
        post_migrate.connect(_ensure_schedules, sender=self)


SWEEP_TASK_NAME = "webhooks: sweep deliveries"
PURGE_TASK_NAME = "webhooks: purge delivered events"


def _ensure_schedules(**_kwargs) -> None:
    """Create the delivery sweep and the retention purge once; then they belong to the ops
    console (like the saga sweeper's schedule)."""
    from django.conf import settings
    from django_celery_beat.models import IntervalSchedule

    from config.periodic import ensure_periodic_task

    wanted = [
        (
            SWEEP_TASK_NAME,
            "webhooks.sweep",
            max(1, int(settings.WEBHOOKS_SWEEP_INTERVAL)),
            IntervalSchedule.SECONDS,
            "Rings endpoints whose due deliveries lost their doorbell or their worker.",
        ),
        (
            PURGE_TASK_NAME,
            "webhooks.purge",
            1,
            IntervalSchedule.HOURS,
            "Deletes delivered events older than WEBHOOKS_RETENTION_DAYS, in batches.",
        ),
    ]
    for wanted_task in wanted:
        # Set explicitly, the sweep's interval is applied at every migrate, as the saga sweep's.
        explicit = wanted_task[0] == SWEEP_TASK_NAME and settings.WEBHOOKS_SWEEP_INTERVAL_SET
        ensure_periodic_task(*wanted_task, apply_interval=explicit)
