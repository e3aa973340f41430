"""The "ops" group: support staff who may retry, compensate and resolve sagas."""

from django.contrib.auth.management import create_permissions
from django.db import migrations


def create_ops_group(apps, schema_editor):
    # Permissions are normally created after all migrations; create them now so the group can
    # be given its permission in this same migration.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="ops")
    perm = Permission.objects.get(content_type__app_label="sagas", codename="operate_saga")
    group.permissions.add(perm)


def noop(apps, schema_editor):
    pass


class Migration(migrations.Migration):
    dependencies = [
        ("sagas", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_ops_group, noop)]
