"""issue_token prints only a stable token; seed_demo is idempotent."""

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from inventory.models import Product


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_issue_token_creates_the_user_and_prints_only_its_token():
    """The only output is the token key of the (new) user, and running it again prints the same."""
    first = run("issue_token", "alice")
    second = run("issue_token", "alice")

    user = get_user_model().objects.get(username="alice")
    assert first == f"{Token.objects.get(user=user).key}\n"
    assert second == first
    assert get_user_model().objects.filter(username="alice").count() == 1
    assert not user.is_staff
    assert not user.has_usable_password()


@pytest.mark.django_db
def test_issue_token_staff_makes_ops_staff_who_may_operate_sagas():
    """--staff sets is_staff and adds the "ops" group, which carries sagas.operate_saga."""
    run("issue_token", "bob")
    key = run("issue_token", "bob", "--staff").strip()

    user = get_user_model().objects.get(username="bob")
    assert Token.objects.get(user=user).key == key
    assert user.is_staff
    assert list(user.groups.values_list("name", flat=True)) == ["ops"]
    assert user.has_perm("sagas.operate_saga")


@pytest.mark.django_db
def test_seed_demo_twice_gives_one_demo_user_and_the_same_catalog(client):
    """A second run creates nothing new, and the printed login works in the ops console."""
    first_output = run("seed_demo")
    catalog = list(Product.objects.values_list("sku", "name", "price", "stock_on_hand"))
    second_output = run("seed_demo")

    assert get_user_model().objects.filter(username="demo-staff").count() == 1
    assert list(Product.objects.values_list("sku", "name", "price", "stock_on_hand")) == catalog
    assert len(catalog) == 6
    assert "demo-staff / demo-staff-password" in first_output
    assert "(0 new)" in second_output

    staff = get_user_model().objects.get(username="demo-staff")
    assert staff.is_staff and not staff.is_superuser
    assert staff.has_perm("sagas.operate_saga")
    assert staff.has_perms(["sagas.view_saga", "orders.view_order", "inventory.change_product"])
    assert client.login(username="demo-staff", password="demo-staff-password")
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_seed_demo_keeps_stock_levels_it_finds():
    """Stock that moved since the first run (orders, restocks) is not reset by a rerun."""
    run("seed_demo")
    Product.objects.filter(sku="SR-MUG").update(stock_on_hand=7)

    run("seed_demo")

    assert Product.objects.get(sku="SR-MUG").stock_on_hand == 7
