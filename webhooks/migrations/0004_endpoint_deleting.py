"""An endpoint whose delete is unfinished is told apart from one staff switched off: events are
written for a switched-off endpoint (held until it is back on), not for one being deleted.

Endpoints left switched off by an unfinished delete before this migration count as switched
off by staff: events are held for them until the delete made again takes them along.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("webhooks", "0003_previous_secrets")]

    operations = [
        migrations.AddField(
            model_name="endpoint",
            name="deleting",
            field=models.BooleanField(default=False),
        ),
    ]
