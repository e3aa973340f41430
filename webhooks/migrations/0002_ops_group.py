"""The "ops" group may look at webhook endpoints and deliveries, switch endpoints off and on,
and redeliver dead deliveries."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

CODENAMES = [
    "view_endpoint",
    "change_endpoint",
    "view_delivery",
    "view_event",
    "redeliver_delivery",
]


def grant(apps, schema_editor):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="ops")
    group.permissions.add(
        *Permission.objects.filter(content_type__app_label="webhooks", codename__in=CODENAMES)
    )


def noop(apps, schema_editor):
    pass


class Migration(migrations.Migration):
    dependencies = [
        ("webhooks", "0001_initial"),
        ("sagas", "0002_ops_group"),
    ]

    operations = [migrations.RunPython(grant, noop)]
