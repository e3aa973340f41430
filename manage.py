#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        settings.INSTALLED_APPS  # noqa: B018 - loads the settings module
    except ImproperlyConfigured as exc:
        # A setting the environment lacks or got wrong (SECRET_KEY unset, a malformed
        # DATABASE_URL): its message says what to do; Django's traceback above it said nothing.
        sys.stderr.write(f"sagarunner: {exc}\n")
        sys.exit(2)

    if "runserver" in sys.argv[1:2]:
        from config.tracing import setup_tracing

        setup_tracing("web")  # only if OTEL_* asks for it
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
