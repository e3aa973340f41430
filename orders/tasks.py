"""Celery tasks of the orders app: thin, they call a service."""

from celery import shared_task


@shared_task(name="orders.expire_idempotency_keys", ignore_result=True)
def expire_idempotency_keys() -> int | None:
    """Beat: delete Idempotency-Key records older than IDEMPOTENCY_KEY_TTL_HOURS."""
    from config.periodic import missed_run_is_one_line
    from orders.idempotency import idempotency_expire

    with missed_run_is_one_line("orders.expire_idempotency_keys"):
        return idempotency_expire()
    return None
