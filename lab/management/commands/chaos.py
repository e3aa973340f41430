"""``python manage.py chaos`` (``make chaos``): faults, worker kills, broker restarts, then checks.

Full mode (the default): 1,000 orders, 12 worker kills, 2 broker restarts. ``--quick`` (what
``make test`` runs): 60 orders, 3 kills, 1 broker restart. Both take a provider down for a
while and deploy the next order saga version at 20% of the load (``--no-switch-version``: no
deploy). The run starts and stops its own stack (database, Redis, workers, beat, web); see
:mod:`lab.chaos`. Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import signal
import sys

from django.core.management.base import BaseCommand, CommandError

from lab import chaos


class Command(BaseCommand):
    help = (
        "Run orders over HTTP against a stack of its own while killing workers and restarting "
        "the broker, then check every guarantee; exit 1 on any violation."
    )

    def add_arguments(self, parser):
        parser.add_argument("--quick", action="store_true", help="60 orders, 3 kills, 1 restart")
        parser.add_argument("--orders", type=int, help="orders to place (full 1000, quick 60)")
        parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
        parser.add_argument("--kills", type=int, help="worker SIGKILLs (full 12, quick 3)")
        parser.add_argument(
            "--broker-restarts", type=int, help="broker stops and starts (full 2, quick 1)"
        )
        parser.add_argument("--clients", type=int, help="client threads (full 8, quick 4)")
        parser.add_argument(
            "--rate",
            type=float,
            help="offered orders/s (quick 10; full: half the orders/s the stack finished in a "
            "warm-up before the load, at most 20)",
        )
        parser.add_argument("--settle-timeout", type=float, help="seconds to wait for settling")
        parser.add_argument(
            "--broker-url",
            default=None,
            help="use this broker (e.g. amqp://guest:guest@127.0.0.1:5672//) instead of an own "
            "Redis; its outages are simulated by a proxy that cuts every connection",
        )
        parser.add_argument(
            "--keep", action="store_true", help="keep the database and the logs afterwards"
        )
        parser.add_argument("--json", default=None, help="also write the summary as JSON here")
        parser.add_argument(
            "--outage-seconds",
            type=float,
            help="the provider outage phase: seconds down (full 60, quick 12; 0: none)",
        )
        parser.add_argument(
            "--outage-provider",
            choices=("inventory", "payments", "shipping"),
            help="the provider taken down (default payments)",
        )
        parser.add_argument(
            "--switch-version",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="deploy the next order saga version beside the others at 20%% of the load "
            "(a rolling restart of every process; lab/order_deploy.py); on by default, "
            "--no-switch-version leaves it out",
        )
        parser.add_argument(
            "--no-breakers",
            action="store_true",
            help="switch the provider breakers off (SAGA_PROVIDER_BREAKERS=0), for comparison",
        )

    def handle(self, *args, **opts):
        config = chaos.ChaosConfig.quick() if opts["quick"] else chaos.ChaosConfig()
        for option, attr in [
            ("orders", "orders"),
            ("kills", "kills"),
            ("broker_restarts", "broker_restarts"),
            ("clients", "clients"),
            ("rate", "rate"),
            ("settle_timeout", "settle_timeout"),
            ("outage_seconds", "outage_seconds"),
            ("outage_provider", "outage_provider"),
        ]:
            if opts[option] is not None:
                setattr(config, attr, opts[option])
        config.seed = opts["seed"] if opts["seed"] is not None else _random_seed()
        config.broker_url = opts["broker_url"]
        config.keep = opts["keep"]
        config.json_path = opts["json"]
        config.breakers = not opts["no_breakers"]
        config.version_switch = opts["switch_version"]
        config.users = max(1, min(config.users, config.clients))
        if (
            config.orders < 1
            or (config.rate is not None and config.rate <= 0)
            or config.clients < 1
        ):
            raise CommandError("--orders, --rate and --clients must be positive")

        if not chaos.is_inside():
            if "--seed" not in " ".join(sys.argv):
                sys.argv += ["--seed", str(config.seed)]  # the same run after the re-exec
            chaos.reexec_inside(config, sys.argv)

        # SIGTERM (a CI timeout, `kill`) cleans up like Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
        summary = chaos.run(config, out=sys.stdout)
        if not summary.ok:
            raise CommandError(
                f"{len(summary.violations)} violation(s), "
                f"{len(summary.unexpected_responses)} unexpected response(s)",
                returncode=1,
            )


def _random_seed() -> int:
    import secrets

    return secrets.randbelow(1_000_000)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
