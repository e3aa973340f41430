"""Migration ``sagas.0010``: the pumps' index, built concurrently, and built again when a
build was interrupted.

``CREATE INDEX CONCURRENTLY`` that is cancelled (a lock timeout, a killed ``migrate``) leaves an
invalid index of that name behind, on which a plain re-run would fail ("already exists"). And a
build that finished just before ``migrate`` was killed leaves a valid index with the migration
unrecorded. The tests make each leftover by hand, then run the migration as ``migrate`` does.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder

from tests.migrating import migrate

pytestmark = pytest.mark.django_db(transaction=True)

INDEX = "saga_due_free_idx"
BEFORE = ("sagas", "0009_failed_undo_apart")
MIGRATION = ("sagas", "0010_saga_due_free_idx")


def _index() -> tuple[int, bool, str] | None:
    """``(oid, valid, definition)`` of the index, or ``None``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.indexrelid::int, i.indisvalid, pg_get_indexdef(i.indexrelid) "
            "FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
            [INDEX],
        )
        return cursor.fetchone()


@pytest.fixture
def back_to_0009():
    """The database as before ``0010``; every migration applied again at the end."""
    migrate([BEFORE])
    assert _index() is None
    yield
    migrate()


def test_an_invalid_leftover_of_an_interrupted_build_is_dropped_and_built_again(back_to_0009):
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE INDEX {INDEX} ON sagas_saga (id)")
        cursor.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", [INDEX]
        )
    migrate()
    oid, valid, definition = _index()
    assert valid
    assert "(next_attempt_at)" in definition and "lease_until IS NULL" in definition


def test_a_build_that_finished_before_migrate_was_killed_is_kept(back_to_0009):
    migrate([MIGRATION])  # killed right after the build: nothing later was applied either
    built = _index()
    assert built is not None and built[1]
    MigrationRecorder(connection).record_unapplied(*MIGRATION)
    migrate()
    assert _index() == built  # the same index (same oid), not dropped and built again
    assert (
        MigrationRecorder(connection)
        .migration_qs.filter(app=MIGRATION[0], name=MIGRATION[1])
        .exists()
    )
