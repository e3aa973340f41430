"""Signal Idempotency-Key values kept before the header was read as UTF-8 (WSGI hands header
values over as Latin-1): a non-ASCII key is rewritten as its client wrote it, so that a retry
sent after the deploy is still a replay.

Not covered: a key stored by the old code while this runs (a rolling deploy), and the way
back (a rewritten key cannot be told from one sent as UTF-8 since, so the reverse does
nothing).
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
    SagaSignal = apps.get_model("sagas", "SagaSignal")
    for signal in SagaSignal.objects.filter(key__regex=r"[^\x01-\x7f]").iterator():
        key = latin1_as_utf8(signal.key)
        taken = SagaSignal.objects.filter(saga_id=signal.saga_id, name=signal.name, key=key)
        if key != signal.key and not taken.exists():
            signal.key = key
            signal.save(update_fields=["key"])


class Migration(migrations.Migration):
    dependencies = [("sagas", "0012_wait_seconds_on_the_step")]

    operations = [migrations.RunPython(_rewrite, migrations.RunPython.noop)]
