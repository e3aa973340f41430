"""Every secret a rotation replaced keeps its own grace period: the one previous secret (and
its expiry) becomes a list of them."""

from django.db import migrations, models


def _to_list(apps, schema_editor):
    Endpoint = apps.get_model("webhooks", "Endpoint")
    rotated = Endpoint.objects.exclude(previous_secret="").exclude(previous_secret_expires_at=None)
    for endpoint in rotated.iterator():
        endpoint.previous_secrets = [
            {
                "secret": endpoint.previous_secret,
                "expires_at": endpoint.previous_secret_expires_at.isoformat(),
            }
        ]
        endpoint.save(update_fields=["previous_secrets"])


def _to_one(apps, schema_editor):
    Endpoint = apps.get_model("webhooks", "Endpoint")
    from datetime import datetime

    for endpoint in Endpoint.objects.exclude(previous_secrets=[]).iterator():
        newest = endpoint.previous_secrets[0]
        endpoint.previous_secret = newest["secret"]
        endpoint.previous_secret_expires_at = datetime.fromisoformat(newest["expires_at"])
        endpoint.save(update_fields=["previous_secret", "previous_secret_expires_at"])


class Migration(migrations.Migration):
    dependencies = [("webhooks", "0002_ops_group")]

    operations = [
        migrations.AddField(
            model_name="endpoint",
            name="previous_secrets",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.RunPython(_to_list, _to_one),
        migrations.RemoveField(model_name="endpoint", name="previous_secret"),
        migrations.RemoveField(model_name="endpoint", name="previous_secret_expires_at"),
    ]
