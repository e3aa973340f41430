"""WSGI entry point for gunicorn."""

import os
from collections.abc import Callable, Iterable
from typing import Any

from django.core.wsgi import get_wsgi_application

from config.tracing import setup_tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
setup_tracing("web")  # only if OTEL_* asks for it; before the app loads its middleware

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def without_head_bodies(app: WSGIApp) -> WSGIApp:
    """Answer ``HEAD`` with the headers a ``GET`` gets (its ``Content-Length`` included) and no
    body, as RFC 9110 asks.

    Django renders the body for ``HEAD`` too and leaves dropping it to the server; gunicorn
    drops it with a warning ("WSGI app sent body bytes on a no-body response") on every such
    request, which a load balancer's ``HEAD`` probe turns into a line per probe.
    """

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        result = app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "HEAD":
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()  # Django's request_finished: the server will not see this iterable
        return []

    return wrapped


application = without_head_bodies(get_wsgi_application())
