"""``manage.py seed_demo``: the demo catalog and the demo staff user. Idempotent.

Running it again updates names and prices to the demo values, leaves stock levels alone (orders
may hold reservations against them) and sets the demo staff password back to the configured one
when it differs, so the printed login always works (and a signed-in session survives a rerun).
"""

from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Q

from inventory.models import Product
from orders.management.commands._accounts import ensure_user, make_ops_staff

DEMO_STAFF_USERNAME = "demo-staff"

# sku, name, price (EUR), initial stock
DEMO_CATALOG = [
    ("SR-MUG", "Sagarunner mug", "12.00", 100),
    ("SR-TEE", "Compensation T-shirt", "24.00", 60),
    ("SR-CAP", "Idempotent cap", "18.50", 40),
    ("SR-BOOK", "Enterprise Integration Patterns (used)", "39.90", 10),
    ("SR-STICKERS", "Pivot sticker pack", "3.50", 500),
    ("SR-LAMP", "Backoff desk lamp", "49.00", 3),  # scarce: try an out-of-stock order
]

# What the demo staff user may see and change in the ops console (operating sagas comes from
# the "ops" group).
VIEW_MODELS = {
    "sagas": ["saga", "sagastep", "sagaevent"],
    "orders": ["order", "orderitem"],
    "inventory": ["product", "reservation", "reservationline"],
    "payments": ["payment", "providerauthorization", "provideroperation"],
    "shipping": ["shipment"],
    # Who did what, from where: ops actions, tokens issued and revoked, login lockouts.
    "audit": ["auditentry"],
    # API tokens: who holds one and until when (revoking is deleting, below).
    "knox": ["authtoken"],
    # Login lockouts (django-axes): who is locked out, and the failed logins behind it.
    "axes": ["accessattempt", "accessfailurelog"],
    # The sweep's schedule: support staff see it and may slow it down or speed it up.
    "django_celery_beat": ["periodictask", "intervalschedule", "crontabschedule"],
}
CHANGE_MODELS = {
    "sagas": ["saga"],
    "orders": ["order"],
    "inventory": ["product"],
    "django_celery_beat": ["periodictask", "intervalschedule"],
}
# Changing the sweep to an interval nobody used before creates that interval.
ADD_MODELS = {"django_celery_beat": ["intervalschedule"]}
# Revoking a client's leaked token; unlocking a locked-out login.
DELETE_MODELS = {"knox": ["authtoken"], "axes": ["accessattempt"]}


def _permissions(models_by_app: dict[str, list[str]], action: str) -> Q:
    query = Q(pk__in=[])
    for app_label, models in models_by_app.items():
        query |= Q(
            content_type__app_label=app_label,
            codename__in=[f"{action}_{model}" for model in models],
        )
    return query


class Command(BaseCommand):
    help = "Create or refresh the demo catalog and the demo staff user (idempotent)."

    def handle(self, *args, **options) -> None:
        with transaction.atomic():
            created = 0
            for sku, name, price, stock in DEMO_CATALOG:
                _, was_created = Product.objects.update_or_create(
                    sku=sku,
                    defaults={"name": name, "price": Decimal(price), "currency": "EUR"},
                    create_defaults={
                        "name": name,
                        "price": Decimal(price),
                        "currency": "EUR",
                        "stock_on_hand": stock,
                    },
                )
                created += was_created

            password = settings.DEMO_STAFF_PASSWORD
            staff = ensure_user(DEMO_STAFF_USERNAME)
            # The demo login obeys the same password rules as everyone's.
            try:
                validate_password(password, staff)
            except ValidationError as exc:
                rules = " ".join(exc.messages)
                raise CommandError(
                    f"DEMO_STAFF_PASSWORD is refused by the password rules: {rules}"
                ) from None
            # Only when it differs: a new hash (new salt) would end every session of the demo
            # login, so each `make run` would log the ops console out.
            if not staff.check_password(password):
                staff.set_password(password)
                staff.save(update_fields=["password"])
            make_ops_staff(staff)
            staff.user_permissions.add(
                *Permission.objects.filter(
                    _permissions(VIEW_MODELS, "view")
                    | _permissions(CHANGE_MODELS, "change")
                    | _permissions(ADD_MODELS, "add")
                    | _permissions(DELETE_MODELS, "delete")
                )
            )

        self.stdout.write(
            f"Demo catalog: {len(DEMO_CATALOG)} products ({created} new). "
            f"Demo staff login: {DEMO_STAFF_USERNAME} / {password} (ops console: /admin/)"
        )
