"""Celery tasks of the webhooks app (routed to WEBHOOKS_QUEUE): thin, they call delivery."""

from celery import shared_task


@shared_task(name="webhooks.deliver", ignore_result=True)
def deliver(endpoint_id: str) -> int:
    """Doorbell: deliver the endpoint's due deliveries (see webhooks.delivery)."""
    from webhooks.delivery import deliver_endpoint

    return deliver_endpoint(endpoint_id)


@shared_task(name="webhooks.sweep", ignore_result=True)
def sweep() -> int | None:
    """Beat: ring endpoints whose due deliveries lost their doorbell or their worker."""
    from config.periodic import missed_run_is_one_line
    from webhooks.delivery import sweep as run

    with missed_run_is_one_line("webhooks.sweep"):
        return run()
    return None


@shared_task(name="webhooks.purge", ignore_result=True)
def purge() -> int | None:
    """Beat: delete delivered events older than WEBHOOKS_RETENTION_DAYS, in batches."""
    from config.periodic import missed_run_is_one_line
    from webhooks.delivery import purge as run

    with missed_run_is_one_line("webhooks.purge"):
        return run()
    return None
