"""The project's tables carry no index another index makes redundant, and the migrations that
dropped the redundant ones (``config.migration_ops.DropForeignKeyIndex``) go both ways.

Django gives every foreign key an index of its own; where a unique constraint or a composite
index starts with the same column, that index answers the same lookups and every insert still
pays for it (five step rows per saga start, for one). A model added later with the same
redundancy fails the first test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.apps import apps
from django.db import connection

from tests.conftest import REPO_ROOT
from tests.migrating import migrate

pytestmark = pytest.mark.django_db(transaction=True)


def _project_tables() -> list[str]:
    return sorted(
        {
            model._meta.db_table
            for config in apps.get_app_configs()
            # The apps of this checkout (third-party tables are theirs to index).
            if Path(config.path).parent == REPO_ROOT
            for model in config.get_models()
            if model._meta.managed
        }
    )


def _btree_indexes(tables: list[str]) -> list[tuple[str, str, bool, bool, list[int], list[int]]]:
    """``(table, index, unique, partial, key columns, operator classes)`` of each plain btree
    index (no expression) on ``tables``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.relname, c.relname, i.indisunique, i.indpred IS NOT NULL, "
            "  i.indkey::int2[]::int[], i.indclass::oid[]::int[] "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE t.relname = ANY(%s) AND a.amname = 'btree' AND i.indexprs IS NULL",
            [tables],
        )
        return [(t, n, u, p, list(k), list(o)) for t, n, u, p, k, o in cursor.fetchall()]


def test_no_plain_index_is_a_leading_part_of_another_on_the_same_table():
    """An index that is neither unique nor partial is redundant when another index on its
    table, itself not partial, starts with the same columns in the same operator classes."""
    indexes = _btree_indexes(_project_tables())
    assert len(indexes) > 20  # the catalog query found the project's tables
    redundant = [
        f"{table}.{name} (covered by {other})"
        for table, name, unique, partial, keys, classes in indexes
        if not unique and not partial
        for o_table, other, _, o_partial, o_keys, o_classes in indexes
        if o_table == table
        and other != name
        and not o_partial
        and len(o_keys) > len(keys)
        and o_keys[: len(keys)] == keys
        and o_classes[: len(classes)] == classes
    ]
    assert redundant == []


def _exists(index: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [index])
        return cursor.fetchone()[0]


def test_the_dropped_foreign_key_indexes_come_back_going_back_and_go_again():
    """Going back to before the drop builds each index again (under Django's own name for it),
    so an earlier release's migrations still line up; going forward drops it again."""
    dropped = {
        ("sagas", "0014_sagastep_held_generation"): [
            "sagas_sagastep_saga_id_65cfbf6d",
            "sagas_sagasignal_saga_id_ca6d3cd9",
        ],
        ("orders", "0003_idempotency_keys_as_utf8"): [
            "orders_order_owner_id_b000b586",
            "orders_orderitem_order_id_fe61a34d",
            "orders_idempotencyrecord_user_id_c58b4115",
        ],
        ("inventory", "0001_initial"): ["inventory_reservationline_reservation_id_3333fa7b"],
        ("webhooks", "0005_endpoint_idempotency_key"): [
            "webhooks_delivery_endpoint_id_6cbee67d",
            "webhooks_endpoint_owner_id_8529ff96",
        ],
    }
    names = [name for group in dropped.values() for name in group]
    assert not any(_exists(name) for name in names)
    try:
        migrate(list(dropped))
        assert all(_exists(name) for name in names)
    finally:
        migrate()
    assert not any(_exists(name) for name in names)
