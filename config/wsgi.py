"""WSGI entry point for gunicorn."""

import os

from django.core.wsgi import get_wsgi_application

from config.tracing import setup_tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
setup_tracing("web")  # only if OTEL_* asks for it; before the app loads its middleware

application = get_wsgi_application()
