"""The length of the wait a saga is parked at, fixed when it parks (a nullable column: no
rewrite of the table; rows parked before it fall back to the step's timeout)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("sagas", "0010_saga_due_free_idx"),
    ]

    operations = [
        migrations.AddField(
            model_name="saga",
            name="wait_seconds",
            field=models.FloatField(blank=True, null=True),
        ),
    ]
