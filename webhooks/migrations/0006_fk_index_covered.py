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
        ("webhooks", "0005_endpoint_idempotency_key"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        DropForeignKeyIndex(
            model_name="delivery",
            name="endpoint",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="deliveries",
                to="webhooks.endpoint",
            ),
        ),
        DropForeignKeyIndex(
            model_name="endpoint",
            name="owner",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="webhook_endpoints",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
    ]
