from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _create_cache_table(using: str = "default", **_kwargs: Any) -> None:
    """The database cache's table (``CACHE_URL=db://``), made by every ``migrate`` whatever
    the cache is then.

    A migration runs once, and ``createcachetable`` makes only the tables of the caches
    configured when it runs: a database migrated under a Redis cache and then run with
    ``db://`` (set, or the default that comes with a RabbitMQ broker) had no table, and every
    API request failed on the rate limit's count. Both skip a table that exists.
    """
    from django.conf import settings
    from django.core.management import call_command
    from django.core.management.commands.createcachetable import Command

    call_command("createcachetable", database=using, verbosity=0)  # any other database cache
    command = Command()
    command.verbosity = 0
    command.create_table(using, settings.DB_CACHE_TABLE, dry_run=False)


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and API tokens"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from accounts import lockout, schema  # noqa: F401 - signal receivers, OpenAPI scheme

        post_migrate.connect(_create_cache_table, sender=self)
        post_migrate.connect(_ensure_rate_limit_purge_schedule, sender=self)


PURGE_RATE_LIMITS_TASK_NAME = "accounts: purge rate-limit counts"


def _ensure_rate_limit_purge_schedule(**_kwargs: Any) -> None:
    """Create the purge of the rate limits' ended windows (every 10 minutes) once; after that it
    belongs to the ops console (like the sweeper's schedule in sagas.apps)."""
    from config.periodic import ensure_periodic_task

    ensure_periodic_task(
        PURGE_RATE_LIMITS_TASK_NAME,
        "accounts.purge_rate_limit_counts",
        10,
        "minutes",
        "Deletes the API rate limits' counts whose window has ended (kept in the database when "
        "the cache is not Redis).",
    )
