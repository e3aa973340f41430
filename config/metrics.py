"""``/metrics``: Prometheus text, for the scraper (no authentication, like ``/healthz``).

Part of the shell (``config.urls`` routes it): it reads the engine's metrics, so it does not
live with the API helpers every app imports.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from drf_spectacular.utils import extend_schema

from config.api_errors import read_only_endpoint
from sagas.metrics import render_metrics


@extend_schema(exclude=True)
@never_cache
@read_only_endpoint
def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = render_metrics()
    return HttpResponse(body, content_type=content_type)
