#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    if "runserver" in sys.argv[1:2]:
        from config.tracing import setup_tracing

        setup_tracing("web")  # only if OTEL_* asks for it
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
