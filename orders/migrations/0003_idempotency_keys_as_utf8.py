"""Idempotency-Key values kept before the header was read as UTF-8 (WSGI hands header values
over as Latin-1): a non-ASCII key is rewritten as its client wrote it, so that a retry sent
after the deploy still replays its order instead of placing a second one.

Not covered: a key stored by the old code while this runs (a rolling deploy), and the way
back (a rewritten key cannot be told from one sent as UTF-8 since, so the reverse does
nothing): there, a retry within the keys' lifetime is not recognised.
"""

from django.db import migrations


def latin1_as_utf8(value: str) -> str:
    """As ``config.text.latin1_as_utf8`` reads it when this was written (kept here, so that a
    later change there cannot change what this migration did)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _rewrite(apps, schema_editor):
    IdempotencyRecord = apps.get_model("orders", "IdempotencyRecord")
    for record in IdempotencyRecord.objects.filter(key__regex=r"[^\x01-\x7f]").iterator():
        key = latin1_as_utf8(record.key)
        taken = IdempotencyRecord.objects.filter(user_id=record.user_id, key=key).exists()
        if key != record.key and not taken:
            record.key = key
            record.save(update_fields=["key"])


class Migration(migrations.Migration):
    dependencies = [("orders", "0002_idempotency_record")]

    operations = [migrations.RunPython(_rewrite, migrations.RunPython.noop)]
