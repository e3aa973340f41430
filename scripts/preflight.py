#!/usr/bin/env python3
"""``make test`` preflight: are PostgreSQL and Redis reachable? If not, fail at once and say
how to start them.

Standard library only. Reads the same variables as the settings and the test harness
(``DATABASE_URL``, ``CELERY_BROKER_URL``) with the same local defaults.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/sagarunner"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/15"  # the test harness's dedicated Redis db
# URL scheme -> (service, default port)
SERVICES = {
    "postgres": ("postgres", 5432),
    "postgresql": ("postgres", 5432),
    "pgsql": ("postgres", 5432),
    "redis": ("redis", 6379),
    "rediss": ("redis", 6379),
    "amqp": ("amqp", 5672),
    "pyamqp": ("amqp", 5672),
}
HOW_TO_START = {
    "postgres": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "redis": "redis-server --daemonize yes --bind 127.0.0.1 --port 6379",
    "amqp": "rabbitmq-server -detached",
}


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def main() -> int:
    problems = []
    for variable, default in (
        ("DATABASE_URL", DEFAULT_DATABASE_URL),
        ("CELERY_BROKER_URL", DEFAULT_BROKER_URL),
    ):
        url = os.environ.get(variable) or default
        parts = urlsplit(url)
        scheme = parts.scheme.split("+")[0]
        if scheme not in SERVICES:
            problems.append(f"{variable}={url}: the test suite needs PostgreSQL and Redis")
            continue
        service, default_port = SERVICES[scheme]
        host, port = parts.hostname or "127.0.0.1", parts.port or default_port
        if not reachable(host, port):
            problems.append(
                f"{variable}: nothing answers on {host}:{port}. Start it with:\n"
                f"    {HOW_TO_START[service]}"
            )
    if problems:
        print("make test: the services the suite runs against are not reachable.", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(
            "(or point DATABASE_URL / CELERY_BROKER_URL at running ones)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
