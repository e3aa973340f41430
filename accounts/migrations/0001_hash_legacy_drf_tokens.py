"""Tokens issued before tokens were hashed (DRF's ``authtoken_token``, kept in clear) become
knox tokens: the same token string keeps working, now stored as a SHA-512 digest, and expires
``API_TOKEN_TTL_DAYS`` after this migration runs. The clear-text rows are then deleted (the
empty ``authtoken_token`` table is left for the operator to drop). A database that never had
DRF's tokens (a fresh install) skips this.
"""

from datetime import timedelta

from django.conf import settings
from django.db import migrations
from django.utils import timezone

LEGACY_TABLE = "authtoken_token"


def hash_legacy_tokens(apps, schema_editor):
    from knox.crypto import hash_token
    from knox.settings import CONSTANTS

    connection = schema_editor.connection
    if LEGACY_TABLE not in connection.introspection.table_names():
        return
    AuthToken = apps.get_model("knox", "AuthToken")
    expiry = timezone.now() + timedelta(days=settings.API_TOKEN_TTL_DAYS)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT key, user_id FROM {LEGACY_TABLE}")
        rows = cursor.fetchall()
    for key, user_id in rows:
        AuthToken.objects.update_or_create(
            digest=hash_token(key),
            defaults={
                "token_key": key[: CONSTANTS.TOKEN_KEY_LENGTH],
                "user_id": user_id,
                "expiry": expiry,
            },
        )
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {LEGACY_TABLE}")


class Migration(migrations.Migration):
    dependencies = [
        ("knox", "0009_extend_authtoken_field"),
    ]

    operations = [
        migrations.RunPython(hash_legacy_tokens, migrations.RunPython.noop, elidable=True),
    ]
