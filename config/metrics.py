"""``/metrics``: Prometheus text, for the scraper (no authentication, like ``/healthz``).

Part of the shell (``config.urls`` routes it): it reads the engine's metrics, so it does not
live with the API helpers every app imports.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from drf_spectacular.utils import extend_schema

from config.api_errors import read_only_endpoint
from config.recent import Recent
from sagas.metrics import render_metrics

_recent: Recent[tuple[bytes, str]] = Recent(lambda: settings.METRICS_REUSE_SECONDS)


def recent_metrics() -> tuple[bytes, str]:
    """The exposition, rendered at most ``METRICS_REUSE_SECONDS`` ago by this process.

    ``/metrics`` is open to anyone, and a render counts every saga per state in the database:
    a loop of requests was a loop of such counts. A scraper every 15 s or more sees no
    difference; one render runs at a time, and requests arriving meanwhile take its answer.
    """
    return _recent.get(render_metrics)


@extend_schema(exclude=True)
@never_cache
@read_only_endpoint
def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = recent_metrics()
    return HttpResponse(body, content_type=content_type)
