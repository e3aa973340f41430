"""URL map: the REST API under /api/v1/, the ops console under /admin/, health and metrics."""

from django.contrib import admin
from django.urls import path, re_path

from config.health import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    re_path(r"^healthz/?$", healthz, name="healthz"),
]
