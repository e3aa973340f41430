"""The OpenAPI document (``/api/schema/``) and its Swagger page (``/api/docs/``), whose errors are
the API's JSON like every other route's under ``/api/``.

drf-spectacular's views render what they serve, YAML or HTML, and DRF renders an error with the
renderer it negotiated: a ``404`` for ``?format=xml``, a ``406`` for ``Accept: application/xml``
or a ``429`` came back as YAML, or as an HTML page. A client that follows the schema parses one
error shape; these views now give it that.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response


class _JsonErrors:
    """A DRF view mixin: an error response is rendered as JSON whatever the view serves."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        if isinstance(response, Response) and response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response


class SchemaView(_JsonErrors, SpectacularAPIView):
    """``/api/schema/``: the OpenAPI document (YAML, or JSON with ``?format=json``)."""


class SchemaDocsView(_JsonErrors, SpectacularSwaggerSplitView):
    """``/api/docs/``: Swagger UI over the document."""
