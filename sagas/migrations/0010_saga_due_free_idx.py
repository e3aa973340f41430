"""The pumps' index: active sagas that are due and held by no task, by due time.

Built with ``CREATE INDEX CONCURRENTLY`` on PostgreSQL, so a large ``sagas_saga`` keeps taking
writes while it builds (the migration is not atomic for that reason); other databases get a
plain index.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return migrations.AddIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )
        # A concurrent build that was interrupted (a cancel, a lock timeout, a killed migrate)
        # leaves an invalid index of that name behind, and one that finished just before the
        # migrate was killed is there already: drop the first and build again, keep the second.
        with schema_editor.connection.cursor() as cursor:
            # to_regclass resolves the name as CREATE and DROP do (the search path), so an
            # index of that name in another schema is not taken for this one.
            cursor.execute(
                "SELECT i.indisvalid FROM pg_index i "
                "WHERE i.indexrelid = to_regclass(%s) AND i.indrelid = to_regclass(%s)",
                [self.index.name, "sagas_saga"],
            )
            found = cursor.fetchone()
        if found is not None:
            if found[0]:
                return None
            name = schema_editor.quote_name(self.index.name)
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        return super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_backwards(
            self, app_label, schema_editor, from_state, to_state
        )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0009_failed_undo_apart"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="saga",
            index=models.Index(
                condition=models.Q(
                    ("lease_until__isnull", True), ("state__in", ["running", "compensating"])
                ),
                fields=["next_attempt_at"],
                name="saga_due_free_idx",
            ),
        ),
    ]
