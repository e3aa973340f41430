"""Celery tasks of the orders app: thin, they call a service."""

from celery import shared_task


@shared_task(name="orders.expire_idempotency_keys", ignore_result=True)
def expire_idempotency_keys() -> int:
    """Beat: delete Idempotency-Key records older than IDEMPOTENCY_KEY_TTL_HOURS."""
    from orders.idempotency import idempotency_expire

    return idempotency_expire()
