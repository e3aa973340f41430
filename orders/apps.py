from django.apps import AppConfig
from django.db.models.signals import post_migrate


class OrdersConfig(AppConfig):
    name = "orders"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the "order" saga type, so every process that loads Django can run it."""
        from orders.events import flag_in_flight_orders
        from orders.saga import order_saga, order_saga_v1
        from sagas.public import register
        from webhooks.signals import subscribed

        register(order_saga_v1)  # orders placed before the waits; see orders.saga
        register(order_saga)
        subscribed.connect(flag_in_flight_orders, dispatch_uid="orders.flag_in_flight_orders")
        post_migrate.connect(_ensure_idempotency_expiry_schedule, sender=self)


EXPIRE_IDEMPOTENCY_TASK_NAME = "orders: expire idempotency keys"


def _ensure_idempotency_expiry_schedule(**_kwargs) -> None:
    """Create the hourly clean-up of expired Idempotency-Key records once; after that it
    belongs to the ops console (like the sweeper's schedule in sagas.apps)."""
    from config.periodic import ensure_periodic_task

    ensure_periodic_task(
        EXPIRE_IDEMPOTENCY_TASK_NAME,
        "orders.expire_idempotency_keys",
        1,
        "hours",
        "Deletes Idempotency-Key records older than IDEMPOTENCY_KEY_TTL_HOURS.",
    )
