"""A wait's length moves from the saga's row to its step's row: a value on the saga's row could
be read for another wait (a worker of the release before 0011 ends one wait without clearing it
and parks at the next). Sagas parked meanwhile keep theirs: it is copied to the step they wait
at first, in one statement (nullable columns: no rewrite of either table). 0011 and 0012 landed
together, before any release; a deploy from code that had 0011 alone would have to stop its
workers first, since they read the column this drops."""

from django.db import migrations, models
from django.db.models import Exists, OuterRef, Subquery


def copy_to_the_step(apps, schema_editor):
    Saga = apps.get_model("sagas", "Saga")
    SagaStep = apps.get_model("sagas", "SagaStep")
    parked = Saga.objects.filter(
        pk=OuterRef("saga_id"),
        current_step=OuterRef("name"),
        wait_seconds__isnull=False,
        waiting_since__isnull=False,
    )
    SagaStep.objects.filter(Exists(parked)).update(
        wait_seconds=Subquery(parked.values("wait_seconds")[:1])
    )


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
