"""Celery tasks of the webhooks app (routed to WEBHOOKS_QUEUE): thin, they call delivery.

The top of the app: nothing imports this module but the app's ``ready()`` (which registers the
tasks in every process) and Celery. Delivery rings by the task's name.
"""

from celery import shared_task

from config.periodic import missed_run_is_one_line
from webhooks.delivery import DELIVER_TASK, deliver_endpoint
from webhooks.delivery import purge as run_purge
from webhooks.delivery import sweep as run_sweep


@shared_task(name=DELIVER_TASK, ignore_result=True)
def deliver(endpoint_id: str) -> int:
    """Doorbell: deliver the endpoint's due deliveries (see webhooks.delivery)."""
    return deliver_endpoint(endpoint_id)


@shared_task(name="webhooks.sweep", ignore_result=True)
def sweep() -> int | None:
    """Beat: ring endpoints whose due deliveries lost their doorbell or their worker."""
    with missed_run_is_one_line("webhooks.sweep"):
        return run_sweep()
    return None


@shared_task(name="webhooks.purge", ignore_result=True)
def purge() -> int | None:
    """Beat: delete delivered events older than WEBHOOKS_RETENTION_DAYS, in batches."""
    with missed_run_is_one_line("webhooks.purge"):
        return run_purge()
    return None
