"""``/api/v1/products/``: any authenticated user reads the catalog; staff create and change it."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import RegexValidator
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import (
    ClosedInput,
    Pagination,
    StrictCharField,
    StrictDecimalField,
    StrictIntegerField,
)
from config.money import currency_problem, pair_problem
from inventory import catalog
from inventory.models import Product
from inventory.selectors import product_list

SKU_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAX_STOCK = 2_000_000_000  # the column is a 32-bit integer
CURRENCY_HELP = (
    "ISO 4217, in use, in either case (stored upper case, as an order's country is); at most "
    "two decimal places (not KWD, BHD, ...)."
)
#: Three letters, either case: ``eur`` is EUR, as ``gb`` is GB in an order's address.
CURRENCY_PATTERN = r"^[A-Za-z]{3}$"
CURRENCY_INVALID = "Three letters, an ISO 4217 code (e.g. EUR)."


class ProductSerializer(ClosedInput, serializers.ModelSerializer):
    input_name = "a product"

    # Strings only: DRF's CharField took 5 or true and stored "5" or "True".
    sku = StrictCharField(
        max_length=64,
        validators=[
            RegexValidator(
                rf"^{SKU_PATTERN}$",
                "Letters, digits, '.', '_' and '-', starting with a letter or digit.",
            )
        ],
    )
    name = StrictCharField(max_length=200)
    price = StrictDecimalField(
        max_digits=12, decimal_places=2, min_value=Decimal("0"), coerce_to_string=True
    )
    currency = serializers.RegexField(
        CURRENCY_PATTERN,
        max_length=3,
        default="EUR",
        help_text=CURRENCY_HELP,
        error_messages={"invalid": CURRENCY_INVALID},
    )
    stock_on_hand = StrictIntegerField(min_value=0, max_value=MAX_STOCK, default=0)
    reserved = serializers.IntegerField(read_only=True)
    available = serializers.IntegerField(read_only=True)

    class Meta:
        model = Product
        fields = ["sku", "name", "price", "currency", "stock_on_hand", "reserved", "available"]

    def validate_currency(self, value: str) -> str:
        value = value.upper()
        problem = currency_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value

    def validate(self, attrs: dict) -> dict:
        """The price must fit its currency, the one it keeps or the one it gets (a change of
        either alone can break the pair). A change of neither is not asked about a pair stored
        before this rule existed. ``inventory.catalog`` asks again under the row's lock."""
        found = pair_problem(
            attrs,
            attrs.get("price", getattr(self.instance, "price", None)),
            attrs.get("currency", getattr(self.instance, "currency", None)),
        )
        if found:
            field, problem = found
            raise serializers.ValidationError({field: [problem]})
        return attrs


class ProductUpdateSerializer(ProductSerializer):
    """The same fields, all optional, and the sku fixed (it is the product's address)."""

    read_only_names = {
        "sku": "A product's sku cannot be changed: it is the product's address (its URL)."
    }

    sku = StrictCharField(read_only=True)
    currency = serializers.RegexField(
        CURRENCY_PATTERN,
        max_length=3,
        required=False,
        help_text=CURRENCY_HELP,
        error_messages={"invalid": CURRENCY_INVALID},
    )
    stock_on_hand = StrictIntegerField(min_value=0, max_value=MAX_STOCK, required=False)

    class Meta(ProductSerializer.Meta):
        pass


class IsStaffOrReadOnly(permissions.BasePermission):
    def has_permission(self, request: Request, view) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        return bool(request.user and request.user.is_staff)


@extend_schema_view(
    list=extend_schema(
        summary="List products",
        description="The catalog, for any signed-in caller, by sku: each product's price and "
        "currency, its stock on hand, how much of it orders hold (`reserved`) and what can "
        "still be ordered (`available`).",
        tags=["products"],
    ),
    retrieve=extend_schema(
        summary="Get a product",
        description="One product of the catalog by its sku (exactly as written, case "
        "included), for any signed-in caller: its price, currency and stock.",
        tags=["products"],
        parameters=[OpenApiParameter("sku", str, OpenApiParameter.PATH, pattern=SKU_PATTERN)],
    ),
    create=extend_schema(
        summary="Create a product (staff)",
        description="Staff add a product to the catalog: a new `sku`, a `name`, a `price` "
        "that fits its `currency` (`EUR` when left out) and the `stock_on_hand` (`0` when left "
        "out). `201` with the product.",
        tags=["products"],
        request=ProductSerializer,
        responses={201: ProductSerializer},
    ),
    partial_update=extend_schema(
        summary="Change a product (staff)",
        description="Staff change any of a product's `name`, `price`, `currency` and "
        "`stock_on_hand`; the sku is the product's address and stays. Orders already placed "
        "keep the price they were placed at.",
        tags=["products"],
        request=ProductUpdateSerializer,
        responses={200: ProductSerializer},
        parameters=[OpenApiParameter("sku", str, OpenApiParameter.PATH, pattern=SKU_PATTERN)],
    ),
)
class ProductViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    permission_classes = [permissions.IsAuthenticated, IsStaffOrReadOnly]
    serializer_class = ProductSerializer
    pagination_class = Pagination
    lookup_field = "sku"
    # No NUL: PostgreSQL text cannot hold one, so such a sku is simply not found (404).
    lookup_value_regex = "[^/\\x00]+"
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self):
        return product_list()

    def create(self, request: Request, *args, **kwargs) -> Response:
        serializer = ProductSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        product = catalog.product_create(actor=request.user, **serializer.validated_data)
        return Response(ProductSerializer(product).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request: Request, *args, **kwargs) -> Response:
        product = self.get_object()
        serializer = ProductUpdateSerializer(product, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        product = catalog.product_update(
            actor=request.user, sku=product.sku, changes=dict(serializer.validated_data)
        )
        return Response(ProductSerializer(product).data)
