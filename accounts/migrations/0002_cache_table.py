"""The database cache table, for deployments that set ``CACHE_URL=db://`` (no Redis): the rate
limit counters live there. A no-op with a Redis or file cache. Every later ``migrate`` makes it
too, for a database that switches to ``db://`` after this ran (``accounts.apps``)."""

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_hash_legacy_drf_tokens")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
