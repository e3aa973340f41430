"""The rate limits' counts for a cache that is not Redis (accounts.throttling). A new table
that only new code reads or writes, so code from before it runs beside it during a deploy."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_cache_table"),
    ]

    operations = [
        migrations.CreateModel(
            name="RateLimitCount",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("counter", models.CharField(max_length=200)),
                ("window_end", models.DateTimeField()),
                ("hits", models.BigIntegerField()),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("window_end", "counter"),
                        name="accounts_ratelimit_one_count_per_window",
                    )
                ],
            },
        ),
    ]
