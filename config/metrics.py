"""``/metrics``: Prometheus text, for the scraper (no authentication, like ``/healthz``).

Part of the shell (``config.urls`` routes it): it reads the engine's metrics, so it does not
live with the API helpers every app imports.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from drf_spectacular.utils import extend_schema

from config.api_errors import read_only_endpoint
from sagas.metrics import render_metrics

_rendered: tuple[float, bytes, str] | None = None
_rendering = threading.Lock()


def recent_metrics() -> tuple[bytes, str]:
    """The exposition, rendered at most ``METRICS_REUSE_SECONDS`` ago by this process.

    ``/metrics`` is open to anyone, and a render counts every saga per state in the database:
    a loop of requests was a loop of such counts. A scraper every 15 s or more sees no
    difference; one render runs at a time, and requests arriving meanwhile take its answer.
    """
    global _rendered
    reuse = settings.METRICS_REUSE_SECONDS

    def recent() -> tuple[bytes, str] | None:
        last = _rendered
        if last is not None and time.monotonic() - last[0] < reuse:
            return last[1], last[2]
        return None

    found = recent()
    if found is not None:
        return found
    with _rendering:
        found = recent()
        if found is None:
            found = render_metrics()
            _rendered = (time.monotonic(), *found)
        return found


@extend_schema(exclude=True)
@never_cache
@read_only_endpoint
def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = recent_metrics()
    return HttpResponse(body, content_type=content_type)
