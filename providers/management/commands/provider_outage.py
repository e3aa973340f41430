"""``manage.py provider_outage PROVIDER --seconds N`` / ``--end``: a fleet-wide outage.

Takes a fake provider (inventory, payments or shipping) down for every worker on every host:
the outage is a database row every worker reads, not a flag in one process. While it lasts,
each call to that provider fails as a transient error before doing anything.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from providers import outage


class Command(BaseCommand):
    help = (
        "Take a fake provider down for every worker for N seconds (--seconds N), or bring it "
        "back now (--end)."
    )

    def add_arguments(self, parser):
        parser.add_argument("provider", choices=outage.PROVIDERS)
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--seconds", type=float, help="How long the provider stays down.")
        group.add_argument("--end", action="store_true", help="Bring the provider back now.")

    def handle(self, *args, provider: str, seconds: float | None, end: bool, **options):
        if end:
            was_down = outage.end(provider)
            self.stdout.write(
                f"{provider}: back up" if was_down else f"{provider}: was not down; nothing to do"
            )
            return
        if seconds is None or not 0 < seconds <= 86400:
            raise CommandError("--seconds must be more than 0 and at most 86400")
        row = outage.start(provider, seconds)
        self.stdout.write(
            f"{provider}: down until {row.down_until:%Y-%m-%d %H:%M:%S} UTC "
            f"({seconds:g}s); end early with: provider_outage {provider} --end"
        )
