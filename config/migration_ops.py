"""Migration operations every app may use.

Kept apart from the apps' code so a migration imports nothing that changes with the models.
"""

from __future__ import annotations

from django.db import migrations


class DropForeignKeyIndex(migrations.AlterField):
    """Turn ``db_index`` off for a foreign key whose own index another index covers already.

    Django gives every foreign key an index of its own, which is redundant when a unique
    constraint or a composite index starts with the same column (it serves the same lookups,
    and the cascade checks of a deleted parent). A redundant index still costs a write on every
    ``INSERT`` and every non heap-only ``UPDATE`` of the row, so on a table written once per
    saga step it is paid on the hot path for nothing.

    On PostgreSQL the index goes with ``DROP INDEX CONCURRENTLY`` (the migration must say
    ``atomic = False``), so a large table keeps taking writes while it is dropped instead of
    queueing them behind an exclusive lock; going back builds it again concurrently. Other
    databases get Django's own ``AlterField``.
    """

    def _names(self, schema_editor, model) -> tuple[str, str]:
        field = model._meta.get_field(self.name)
        table = model._meta.db_table
        # The names Django gave them when it made them: the index, and the ``LIKE`` index it
        # adds beside a text column's (dropped if present).
        return (
            schema_editor._create_index_name(table, [field.column], suffix=""),
            schema_editor._create_index_name(table, [field.column], suffix="_like"),
        )

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        model = from_state.apps.get_model(app_label, self.model_name)
        for name in self._names(schema_editor, model):
            schema_editor.execute(
                f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(name)}"
            )
        return None

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        name, _ = self._names(schema_editor, model)
        column = model._meta.get_field(self.name).column
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {schema_editor.quote_name(name)} "
            f"ON {schema_editor.quote_name(model._meta.db_table)} "
            f"({schema_editor.quote_name(column)})"
        )
        return None
