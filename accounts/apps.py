from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _create_cache_table(using: str = "default", **_kwargs: Any) -> None:
    """The database cache's table (``CACHE_URL=db://``), made by every ``migrate``.

    A migration runs once: a database first migrated under a Redis cache and switched to
    ``db://`` later would never get the table, and every API request would fail on the rate
    limit's count. ``createcachetable`` skips a table that exists, and does nothing for the
    other caches.
    """
    from django.core.management import call_command

    call_command("createcachetable", database=using, verbosity=0)


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and API tokens"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from accounts import lockout, schema  # noqa: F401 - signal receivers, OpenAPI scheme

        post_migrate.connect(_create_cache_table, sender=self)
