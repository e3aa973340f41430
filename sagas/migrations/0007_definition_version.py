"""Sagas record the definition version they run on and its shape's fingerprint; step rows are
unique by name (the engine addresses steps by name, ``index`` is only a display position).

Every saga that exists before this migration started on the only definition there was:
version 1 of its type. Order sagas get the fingerprint of that definition's shape, frozen here
(the five steps of the order saga, each compensated but the pivot ``confirm_order``), so the
deploy check can tell a later silent edit of version 1 from the shape those sagas run on.
Settled sagas and sagas of other types keep a blank fingerprint ("recorded before fingerprints").
"""

from django.db import migrations, models

# shape_fingerprint() of the order saga as it was when versions were introduced.
ORDER_V1_FINGERPRINT = "585c5ad8da0275b8"


def fingerprint_order_sagas(apps, schema_editor) -> None:
    Saga = apps.get_model("sagas", "Saga")
    unsettled = ["running", "compensating", "needs_manual"]
    Saga.objects.filter(saga_type="order", state__in=unsettled).update(
        definition_fingerprint=ORDER_V1_FINGERPRINT
    )


class Migration(migrations.Migration):
    dependencies = [
        ("sagas", "0006_failed_undo_by_hand"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="sagastep",
            name="saga_step_unique_index",
        ),
        migrations.AddField(
            model_name="saga",
            name="definition_fingerprint",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
        migrations.AddField(
            model_name="saga",
            name="definition_version",
            field=models.PositiveIntegerField(default=1),
        ),
        migrations.RunPython(fingerprint_order_sagas, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="saga",
            index=models.Index(
                condition=models.Q(("state__in", ["running", "compensating", "needs_manual"])),
                fields=["saga_type", "definition_version", "definition_fingerprint"],
                name="saga_active_version_idx",
            ),
        ),
        migrations.AddConstraint(
            model_name="sagastep",
            constraint=models.UniqueConstraint(
                fields=("saga", "name"), name="saga_step_unique_name"
            ),
        ),
    ]
