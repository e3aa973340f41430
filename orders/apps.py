from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the "order" saga type, so every process that loads Django can run it."""
        from orders.saga import order_saga
        from sagas.definition import register

        register(order_saga)
