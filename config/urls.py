"""URL map: the REST API under /api/v1/, the ops console under /admin/, health and metrics."""

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import include, path, re_path
from django.views.generic import TemplateView

from config.api_docs import SchemaDocsView, SchemaView
from config.api_errors import unrouted_api_path
from config.health import healthz
from config.metrics import metrics_view


def no_favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask every page's host for ``/favicon.ico``; "no icon" (204, cached for a day)
    instead of a 404 in the console of every ops console and Swagger page."""
    response = HttpResponse(status=204)
    response["Cache-Control"] = "public, max-age=86400"
    return response


urlpatterns = [
    # The first link `make run` prints: where to go from here.
    path("", TemplateView.as_view(template_name="landing.html"), name="landing"),
    path("admin/", admin.site.urls),
    path("favicon.ico", no_favicon),
    re_path(r"^healthz/?$", healthz, name="healthz"),
    re_path(r"^metrics/?$", metrics_view, name="metrics"),
    path("api/v1/", include("config.api_urls")),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    # The split view serves its start-up script as a file: no inline script, so the content
    # security policy needs no exception for it.
    path("api/docs/", SchemaDocsView.as_view(url_name="schema"), name="swagger-ui"),
    re_path(r"^api/", unrouted_api_path, name="api-unrouted"),
]

# Errors Django answers itself: JSON under /api/, its usual pages elsewhere.
handler400 = "config.api_errors.handler400"
handler403 = "config.api_errors.handler403"
handler404 = "config.api_errors.handler404"
handler500 = "config.api_errors.handler500"
