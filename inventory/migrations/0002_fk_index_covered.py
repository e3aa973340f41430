"""Foreign keys whose own index another index covers lose it (config.migration_ops).

Not atomic: on PostgreSQL each index is dropped concurrently, so the table keeps taking writes.
"""

import django.db.models.deletion
from django.db import migrations, models

from config.migration_ops import DropForeignKeyIndex


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inventory", "0001_initial"),
    ]

    operations = [
        DropForeignKeyIndex(
            model_name="reservationline",
            name="reservation",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="lines",
                to="inventory.reservation",
            ),
        ),
    ]
