"""The rest of the ops console: periodic tasks (the sweep), orders, products, and the
read-only participant records, as the demo staff user sees them."""

from __future__ import annotations

from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from inventory.models import Product, Reservation
from payments.models import Payment
from sagas.apps import SWEEP_TASK_NAME
from sagas.models import SagaState
from shipping.models import Shipment
from tests.admin.conftest import make_saga, needs_manual, running

pytestmark = pytest.mark.django_db


class _FormValues(HTMLParser):
    """The values a browser would submit for the first form with ``form_id``."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.values = form_id, False, {}
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("id") == self.form_id:
            self.inside = True
        if not self.inside:
            return
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button"):
            if a.get("type") in ("checkbox", "radio"):
                if "checked" in a:
                    self.values[name] = a.get("value", "on")
            else:
                self.values[name] = a.get("value", "")
        elif tag == "select" and name:
            self._select = name
            self.values.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in a:
            self.values[self._select] = a.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.values[name] = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data):
        if self._textarea:
            self.values[self._textarea] += data.lstrip("\n")


def form_values(html: str, form_id: str) -> dict[str, str]:
    parser = _FormValues(form_id)
    parser.feed(html)
    return parser.values


@pytest.fixture
def admin_client_(client, django_user_model):
    user = django_user_model.objects.create_superuser("root-rita", password="pw")
    client.force_login(user)
    return client


@pytest.fixture
def demo_staff_client(client):
    """Logged in as the user ``seed_demo`` creates, with its password."""
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    # Through the login form: the lockout backend (django-axes) needs the request.
    response = client.post(
        "/admin/login/",
        {"username": "demo-staff", "password": settings.DEMO_STAFF_PASSWORD, "next": "/admin/"},
    )
    assert response.status_code == 302, response.content[:300]
    return client


# ---------------------------------------------------------------------------------------------
# Periodic tasks
# ---------------------------------------------------------------------------------------------
def test_the_sweep_is_listed_and_its_interval_can_be_changed(admin_client_):
    """django-celery-beat's admin lists the sweep; changing its interval there is saved."""
    task = PeriodicTask.objects.get(name=SWEEP_TASK_NAME)
    listing = admin_client_.get(reverse("admin:django_celery_beat_periodictask_changelist"))
    assert listing.status_code == 200 and SWEEP_TASK_NAME in listing.content.decode()

    url = reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
    page = admin_client_.get(url)
    assert page.status_code == 200
    data = form_values(page.content.decode(), "periodictask_form")
    slower, _ = IntervalSchedule.objects.get_or_create(every=45, period=IntervalSchedule.SECONDS)
    data["interval"] = str(slower.pk)
    response = admin_client_.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    task.refresh_from_db()
    assert task.interval_id == slower.pk and task.task == "sagas.sweep"


def test_demo_staff_can_change_the_sweep_interval(demo_staff_client):
    """The seeded support user (not a superuser) opens the sweep's periodic task, adds a new
    interval from its form and saves the task with it."""
    task = PeriodicTask.objects.get(name=SWEEP_TASK_NAME)
    listing = demo_staff_client.get(reverse("admin:django_celery_beat_periodictask_changelist"))
    assert listing.status_code == 200 and SWEEP_TASK_NAME in listing.content.decode()
    add_url = reverse("admin:django_celery_beat_intervalschedule_add")
    add_page = demo_staff_client.get(add_url)
    assert add_page.status_code == 200
    interval = form_values(add_page.content.decode(), "intervalschedule_form")
    interval.update(every="47", period=IntervalSchedule.SECONDS)
    added = demo_staff_client.post(add_url, interval)
    assert added.status_code == 302, added.context["errors"]
    slower = IntervalSchedule.objects.get(every=47, period=IntervalSchedule.SECONDS)
    url = reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
    page = demo_staff_client.get(url)
    assert page.status_code == 200
    data = form_values(page.content.decode(), "periodictask_form")
    data["interval"] = str(slower.pk)
    response = demo_staff_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    task.refresh_from_db()
    assert task.interval_id == slower.pk


def test_the_dashboard_links_to_the_sweep_task(admin_client_):
    """The saga dashboard links to the sweep's periodic task page."""
    task = PeriodicTask.objects.get(name=SWEEP_TASK_NAME)
    html = admin_client_.get(reverse("admin:sagas_saga_dashboard")).content.decode()
    assert reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]) in html


# ---------------------------------------------------------------------------------------------
# The demo staff user sees every page of the console
# ---------------------------------------------------------------------------------------------
def test_demo_staff_can_open_every_page_and_operate(demo_staff_client):
    """The seeded support user opens the index, dashboard, lists and pages, and gets the ops
    actions (it is in the ops group)."""
    saga = needs_manual(saga_type="order", failed_step="authorize_payment", with_order=True)
    order = saga.order
    payment = Payment.objects.create(order_id=order.pk, currency="EUR", amount=Decimal("24"))
    reservation = Reservation.objects.create(key="saga:x:reserve_inventory", order_id=order.pk)
    shipment = Shipment.objects.create(
        key="saga:x:arrange_shipment", order_id=order.pk, status="arranged"
    )
    urls = [
        "/admin/",
        reverse("admin:sagas_saga_dashboard"),
        reverse("admin:sagas_saga_changelist"),
        reverse("admin:sagas_saga_change", args=[saga.pk]),
        reverse("admin:orders_order_changelist"),
        reverse("admin:orders_order_change", args=[order.pk]),
        reverse("admin:inventory_product_changelist"),
        reverse("admin:inventory_reservation_changelist"),
        reverse("admin:inventory_reservation_change", args=[reservation.pk]),
        reverse("admin:payments_payment_changelist"),
        reverse("admin:payments_payment_change", args=[payment.pk]),
        reverse("admin:shipping_shipment_changelist"),
        reverse("admin:shipping_shipment_change", args=[shipment.pk]),
        reverse("admin:payments_providerauthorization_changelist"),
        reverse("admin:payments_provideroperation_changelist"),
    ]
    for url in urls:
        assert demo_staff_client.get(url).status_code == 200, url
    listing = demo_staff_client.get(reverse("admin:sagas_saga_changelist"))
    choices = {value for value, _ in listing.context["action_form"].fields["action"].choices}
    assert {"retry_now", "compensate", "resolve"} <= choices


# ---------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------
def test_order_list_shows_status_reason_total_and_saga_link(ops_client):
    """Orders show the client-facing status derived from the saga, the cancellation reason or
    step, the total and a link to the saga; the status filter works in SQL."""
    cancelled = make_saga(
        saga_type="order",
        state=SagaState.COMPENSATED,
        step_index=1,
        failed_step="authorize_payment",
        failure_code="payment_declined",
        with_order=True,
    )
    live = running(saga_type="order", with_order=True)
    html = ops_client.get(reverse("admin:orders_order_changelist")).content.decode()
    assert "cancelled" in html and "payment_declined" in html and "24.00 EUR" in html
    assert reverse("admin:sagas_saga_change", args=[cancelled.pk]) in html
    only = ops_client.get(reverse("admin:orders_order_changelist"), {"status": "processing"})
    body = only.content.decode()
    assert str(live.order.pk)[:8] in body and str(cancelled.order.pk)[:8] not in body
    found = ops_client.get(reverse("admin:orders_order_changelist"), {"q": str(cancelled.pk)})
    assert str(cancelled.order.pk)[:8] in found.content.decode()


def test_orders_are_read_only(ops_client):
    """An order is a financial record: no add, change or delete in the admin."""
    saga = make_saga(saga_type="order", with_order=True)
    url = reverse("admin:orders_order_change", args=[saga.order.pk])
    assert 'name="_save"' not in ops_client.get(url).content.decode()
    assert ops_client.post(url, {"total": "1.00"}).status_code == 403
    assert ops_client.get(reverse("admin:orders_order_add")).status_code == 403


# ---------------------------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------------------------
def _product_form(client, product: Product) -> tuple[str, dict[str, str]]:
    url = reverse("admin:inventory_product_change", args=[product.pk])
    return url, form_values(client.get(url).content.decode(), "product_form")


def test_staff_edit_a_product_without_overwriting_reservations(ops_client):
    """Saving a product writes only what changed: a reservation taken while the form was open
    keeps its count; stock on hand, reserved and available show in the list."""
    product = Product.objects.create(sku="SR-MUG", name="Mug", price=12, stock_on_hand=10)
    url, data = _product_form(ops_client, product)
    # A reservation lands while the form is open.
    Product.objects.filter(pk=product.pk).update(reserved=4)
    data.update(name="Sagarunner mug", stock_on_hand="20")
    response = ops_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    product.refresh_from_db()
    assert (product.name, product.stock_on_hand, product.reserved) == ("Sagarunner mug", 20, 4)
    listing = ops_client.get(reverse("admin:inventory_product_changelist")).content.decode()
    assert ">16<" in listing  # available = 20 - 4


def test_stock_on_hand_cannot_go_below_what_is_reserved(ops_client):
    """Lowering stock below the current reservations is refused with a clear error."""
    product = Product.objects.create(sku="SR-CAP", name="Cap", price=5, stock_on_hand=10)
    Product.objects.filter(pk=product.pk).update(reserved=6)
    url, data = _product_form(ops_client, product)
    data["stock_on_hand"] = "5"
    response = ops_client.post(url, data)
    assert response.status_code == 200
    assert "6 units are reserved by open orders" in response.content.decode()
    product.refresh_from_db()
    assert product.stock_on_hand == 10


@pytest.mark.parametrize(
    ("currency", "price", "message"),
    [
        ("ZAZ", "5.00", "not an ISO 4217 currency code in use"),
        ("KWD", "5.00", "KWD has three decimal places"),
        ("JPY", "5.50", "JPY prices are in whole units"),
    ],
)
def test_a_price_its_currency_cannot_carry_is_refused(ops_client, currency, price, message):
    """The console refuses what the API refuses: a product orders could not be paid for."""
    product = Product.objects.create(sku="SR-CAP", name="Cap", price=5, stock_on_hand=10)
    url, data = _product_form(ops_client, product)
    data.update(currency=currency, price=price)
    response = ops_client.post(url, data)
    assert response.status_code == 200
    assert message in response.content.decode()
    product.refresh_from_db()
    assert (product.currency, product.price) == ("EUR", Decimal("5.00"))


def test_a_currency_in_lower_case_is_stored_upper_case(ops_client):
    """As the API takes it, and an order's country: either case, stored upper case."""
    product = Product.objects.create(sku="SR-CAP", name="Cap", price=5, stock_on_hand=10)
    url, data = _product_form(ops_client, product)
    data["currency"] = "gbp"
    assert ops_client.post(url, data).status_code == 302
    product.refresh_from_db()
    assert product.currency == "GBP"


def test_a_stored_pair_is_not_asked_about_unless_it_changes(ops_client):
    """A product stored before the rule (10.50 JPY) still has its stock changed in the console;
    the form writes price and currency together when either changes, so the pair stored is the
    pair it checked, whatever changed meanwhile."""
    product = Product.objects.create(
        sku="SR-OLD", name="Old", price=Decimal("10.50"), currency="JPY", stock_on_hand=3
    )
    url, data = _product_form(ops_client, product)
    data["stock_on_hand"] = "4"
    assert ops_client.post(url, data).status_code == 302
    product.refresh_from_db()
    assert (product.stock_on_hand, product.price, product.currency) == (4, Decimal("10.50"), "JPY")

    Product.objects.filter(pk=product.pk).update(price=Decimal("10.00"), currency="EUR")
    url, data = _product_form(ops_client, product)  # opened at 10.00 EUR
    Product.objects.filter(pk=product.pk).update(price=Decimal("10.50"))  # an edit elsewhere
    data["currency"] = "JPY"
    assert ops_client.post(url, data).status_code == 302
    product.refresh_from_db()
    assert (product.price, product.currency) == (Decimal("10.00"), "JPY")


# ---------------------------------------------------------------------------------------------
# Participants: read-only, searchable by exact ids
# ---------------------------------------------------------------------------------------------
def test_participant_records_are_read_only_and_found_by_order_id(ops_client):
    """Payments, reservations and shipments cannot be changed here; an order id finds them."""
    saga = make_saga(saga_type="order", with_order=True)
    order_id = saga.order.pk
    records = [
        Payment.objects.create(order_id=order_id, currency="EUR", amount=Decimal("24")),
        Reservation.objects.create(key="k-res", order_id=order_id),
        Shipment.objects.create(key="k-ship", order_id=order_id, status="arranged"),
    ]
    for record in records:
        opts = record._meta
        listing = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        found = ops_client.get(listing, {"q": str(order_id)}).content.decode()
        assert f"/{record.pk}/change/" in found, opts.model_name
        missing = ops_client.get(listing, {"q": str(order_id)[:8]}).content.decode()
        assert f"/{record.pk}/change/" not in missing
        change = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[record.pk])
        assert ops_client.post(change, {}).status_code == 403
        assert (
            reverse("admin:orders_order_change", args=[order_id])
            in ops_client.get(change).content.decode()
        )


def test_a_user_without_staff_status_cannot_enter(client):
    """The console is for staff only: others are sent to the login page."""
    User.objects.create_user("client-carl", password="pw")
    client.post("/admin/login/", {"username": "client-carl", "password": "pw"})
    response = client.get(reverse("admin:sagas_saga_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
