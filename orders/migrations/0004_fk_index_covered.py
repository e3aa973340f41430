"""Foreign keys whose own index another index covers lose it (config.migration_ops).

Not atomic: on PostgreSQL each index is dropped concurrently, so the table keeps taking writes.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

from config.migration_ops import DropForeignKeyIndex


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("orders", "0003_idempotency_keys_as_utf8"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        DropForeignKeyIndex(
            model_name="idempotencyrecord",
            name="user",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="idempotency_records",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        DropForeignKeyIndex(
            model_name="order",
            name="owner",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="orders",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        DropForeignKeyIndex(
            model_name="orderitem",
            name="order",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="items",
                to="orders.order",
            ),
        ),
    ]
