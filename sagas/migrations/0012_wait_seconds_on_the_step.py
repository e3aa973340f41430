"""A wait's length moves from the saga's row to its step's row: a value on the saga's row could
be read for another wait (a worker of the release before 0011 ends one wait without clearing it
and parks at the next). Sagas parked meanwhile keep theirs: it is copied to the step they wait
at first (nullable columns: no rewrite of either table)."""

from django.db import migrations, models


def copy_to_the_step(apps, schema_editor):
    Saga = apps.get_model("sagas", "Saga")
    SagaStep = apps.get_model("sagas", "SagaStep")
    parked = Saga.objects.filter(wait_seconds__isnull=False, waiting_since__isnull=False)
    for saga_id, step, seconds in parked.values_list("id", "current_step", "wait_seconds"):
        SagaStep.objects.filter(saga_id=saga_id, name=step).update(wait_seconds=seconds)


class Migration(migrations.Migration):
    dependencies = [
        ("sagas", "0011_saga_wait_seconds"),
    ]

    operations = [
        migrations.AddField(
            model_name="sagastep",
            name="wait_seconds",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.RunPython(copy_to_the_step, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name="saga",
            name="wait_seconds",
        ),
    ]
