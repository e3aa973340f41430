"""The providers table on the saga dashboard, and forcing a breaker from it."""

from __future__ import annotations

import pytest
from django.urls import reverse

from audit.models import AuditEntry
from providers import breaker
from providers.models import Breaker

pytestmark = pytest.mark.django_db

DASHBOARD = "/admin/sagas/saga/dashboard/"


@pytest.fixture
def payments_breaker():
    breaker._known_breakers.clear()
    breaker.ensure_breaker("payments")


def test_dashboard_shows_each_breaker_with_force_buttons_for_ops(ops_client, payments_breaker):
    page = ops_client.get(DASHBOARD).content.decode()
    assert 'id="breaker-payments"' in page
    assert "closed" in page
    assert "Force open" in page


def test_force_open_and_close_from_the_dashboard_are_audited_with_the_user(
    ops_client, ops_user, payments_breaker
):
    url = reverse("admin:providers_breaker_force", args=["payments", "open"])
    response = ops_client.post(url, {"next": DASHBOARD})
    assert response.status_code == 302 and response["Location"] == DASHBOARD
    row = Breaker.objects.get(provider="payments")
    assert row.state == "open" and row.forced
    assert "open (forced)" in ops_client.get(DASHBOARD).content.decode()

    ops_client.post(reverse("admin:providers_breaker_force", args=["payments", "closed"]))
    assert Breaker.objects.get(provider="payments").state == "closed"
    audit = list(
        AuditEntry.objects.filter(target="provider:payments")
        .order_by("at")
        .values_list("action", "actor", "detail")
    )
    assert audit == [
        ("breaker.force_open", ops_user.pk, {"from_state": "closed"}),
        ("breaker.force_closed", ops_user.pk, {"from_state": "open"}),
    ]


def test_staff_outside_ops_see_breakers_but_cannot_force_them(viewer_client, payments_breaker):
    page = viewer_client.get(DASHBOARD).content.decode()
    assert 'id="breaker-payments"' in page and "Force open" not in page
    url = reverse("admin:providers_breaker_force", args=["payments", "open"])
    assert viewer_client.post(url).status_code == 403
    assert Breaker.objects.get(provider="payments").state == "closed"
    assert not AuditEntry.objects.filter(target="provider:payments").exists()


@pytest.mark.parametrize("name", ["nope", "x" * 300], ids=["unknown", "longer-than-a-name"])
def test_forcing_a_provider_that_has_no_breaker_is_refused_and_makes_none_up(
    ops_client, payments_breaker, name
):
    """The name comes from the address: an unknown one would create a phantom breaker, forced
    open, with a metric series an alert may watch (one longer than the column: a 500)."""
    url = reverse("admin:providers_breaker_force", args=[name, "open"])
    response = ops_client.post(url, {"next": DASHBOARD}, follow=True)
    assert response.status_code == 200
    assert "has a breaker" in response.content.decode()
    assert list(Breaker.objects.values_list("provider", flat=True)) == ["payments"]
    assert not AuditEntry.objects.exists()


@pytest.mark.parametrize(
    "sent",
    [{"next": "https://evil.example/"}, {"next": "//evil.example/admin/"}, {}],
    ids=["other-site", "scheme-relative", "missing"],
)
def test_a_force_with_an_unsafe_or_no_next_lands_on_the_dashboard(
    ops_client, payments_breaker, sent
):
    """The buttons live on the saga dashboard. An unsafe or missing ``next`` went to the
    breakers' own list instead, which ops staff without the breaker view permission (the demo
    staff user among them) may not see: the breaker was forced, and they got a bare 403."""
    url = reverse("admin:providers_breaker_force", args=["payments", "open"])
    response = ops_client.post(url, sent, follow=True)

    assert response.status_code == 200
    assert response.redirect_chain == [(DASHBOARD, 302)]
    assert "Breaker of payments: closed -&gt; forced open." in response.content.decode()
    assert Breaker.objects.get(provider="payments").forced


def test_a_force_with_no_next_by_ops_who_may_not_see_sagas_lands_on_the_console_index(
    client, payments_breaker
):
    """Someone who may force breakers but see neither the dashboard nor the breakers' list
    lands where any staff user may go, the console's index, not on a 403."""
    from django.contrib.auth.models import Group, User

    only_ops = User.objects.create_user("ops-only", password="pw", is_staff=True)
    only_ops.groups.add(Group.objects.get(name="ops"))
    client.force_login(only_ops)
    url = reverse("admin:providers_breaker_force", args=["payments", "open"])
    response = client.post(url, follow=True)

    assert response.status_code == 200
    assert response.redirect_chain == [(reverse("admin:index"), 302)]
    assert "Breaker of payments: closed -&gt; forced open." in response.content.decode()
    assert Breaker.objects.get(provider="payments").forced
