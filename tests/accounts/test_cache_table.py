"""``CACHE_URL=db://`` keeps the rate-limit counters in a table that every ``migrate`` makes.

The migration that first made it runs once: a database migrated while its cache was Redis, and
switched to ``db://`` later, had no table, and every API request failed on the count.
"""

from __future__ import annotations

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)

TABLE = "test_cache_switched_later"


def test_migrate_makes_the_database_cache_table_of_a_database_migrated_before(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": TABLE}
    }
    try:
        assert TABLE not in connection.introspection.table_names()  # migrated long ago
        call_command("migrate", verbosity=0)  # nothing left to apply
        assert TABLE in connection.introspection.table_names()
        caches["default"].set("counter", 1, timeout=60)
        assert caches["default"].incr("counter") == 2
        call_command("migrate", verbosity=0)  # and again: the table is kept as it is
        assert caches["default"].get("counter") == 2
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")


def test_migrate_makes_the_db_cache_table_while_the_cache_is_another(settings):
    """Migrated under Redis, run with CACHE_URL=db:// (or a RabbitMQ broker, whose default
    cache it is): the table is there without a migrate of its own."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {settings.DB_CACHE_TABLE}")
    call_command("migrate", verbosity=0)
    assert settings.DB_CACHE_TABLE in connection.introspection.table_names()
