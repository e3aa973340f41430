"""Routes of the REST API under ``/api/v1/`` (each listed in docs/api.md)."""

from django.urls import path
from rest_framework import routers

from accounts.api import CurrentTokenView
from inventory.api import ProductViewSet
from orders.api import OrderViewSet
from sagas.api import SagaViewSet
from webhooks.api import EndpointViewSet


class Router(routers.DefaultRouter):
    """The browsable API root at ``/api/v1/``; no ``.json`` suffix routes (a sku may hold a
    dot, and ``?format=json`` does the same job)."""

    include_format_suffixes = False


router = Router()
router.register("products", ProductViewSet, basename="product")
router.register("orders", OrderViewSet, basename="order")
router.register("sagas", SagaViewSet, basename="saga")
router.register("webhooks", EndpointViewSet, basename="webhook")

# Anything else under /api/ is a JSON 404 (config.urls).
urlpatterns = [
    path("auth/token/", CurrentTokenView.as_view(), name="current-token"),
    *router.urls,
]
