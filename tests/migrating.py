"""Moving this session's test database to a migration and back, for tests of data migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection
from django.db.migrations.executor import MigrationExecutor


def migrate(target: list[tuple[str, str]] | None = None) -> None:
    """Migrate to ``target`` (``[(app, migration)]``), or to the latest of every app."""
    executor = MigrationExecutor(connection)
    executor.migrate(target or executor.loader.graph.leaf_nodes())


@contextmanager
def migrated_to(target: list[tuple[str, str]]) -> Iterator[None]:
    """The database at ``target`` while the block runs (to write rows as they were then),
    then at the latest migrations again, which run on those rows."""
    migrate(target)
    try:
        yield
    finally:
        migrate()
