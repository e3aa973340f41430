"""Staff edits land in the audit log with who, what, when and from where: every add, change and
delete in the ops console (any model: the catalog, django-celery-beat's schedules, users, bulk
"delete selected"), other console actions, and the catalog's writes through the API. Actions
that write their own entry (saga ops, token revocation, unlocking a login) are not recorded
twice."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from knox.models import AuthToken

from audit.console import AuditedAdminMixin
from audit.models import AuditEntry
from inventory.models import Product
from tests.admin.conftest import needs_manual

pytestmark = pytest.mark.django_db

ADDR = "203.0.113.21"


def _editor(*perms: str) -> User:
    """Staff with exactly these ``app_label.codename`` permissions."""
    user = User.objects.create_user("ed-editor", password="pw", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return User.objects.get(pk=user.pk)


def _only_entry() -> AuditEntry:
    entries = list(AuditEntry.objects.all())
    assert len(entries) == 1, [str(e) for e in entries]
    return entries[0]


def test_every_registered_admin_records_its_edits():
    """One mechanism for all: Django's, django-celery-beat's, axes', knox' and ours."""
    registry = admin.site._registry
    assert {User, PeriodicTask, IntervalSchedule, AccessAttempt, AuthToken, Product} <= set(
        registry
    )
    unaudited = [m for m, a in registry.items() if not isinstance(a, AuditedAdminMixin)]
    assert unaudited == []


def test_a_product_changed_in_the_console_is_one_entry(client):
    product = Product.objects.create(sku="lamp", name="Lamp", price=Decimal("19.90"))
    editor = _editor("inventory.view_product", "inventory.change_product")
    client.force_login(editor)
    response = client.post(
        f"/admin/inventory/product/{product.pk}/change/",
        {
            "sku": "lamp",
            "name": "Desk lamp",
            "price": "24.50",
            "currency": "EUR",
            "stock_on_hand": "0",
        },
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    product.refresh_from_db()
    assert (product.name, product.price) == ("Desk lamp", Decimal("24.50"))
    entry = _only_entry()
    assert (entry.action, entry.actor, entry.actor_name) == ("object.changed", editor, "ed-editor")
    assert (entry.target, entry.ip, entry.source) == (
        f"inventory.product:{product.pk}",
        ADDR,
        "admin",
    )
    assert entry.detail["model"] == "inventory.product"
    assert entry.detail["object"] == "lamp (Desk lamp)"
    assert entry.detail["fields"] == ["Name", "Price"]
    assert entry.detail["message"] == "Changed Name and Price."


def test_a_product_added_in_the_console_is_one_entry(client):
    editor = _editor("inventory.add_product")
    client.force_login(editor)
    response = client.post(
        "/admin/inventory/product/add/",
        {"sku": "mug", "name": "Mug", "price": "4.00", "currency": "EUR", "stock_on_hand": "3"},
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    product = Product.objects.get(sku="mug")
    entry = _only_entry()
    assert (entry.action, entry.actor, entry.target, entry.ip) == (
        "object.added",
        editor,
        f"inventory.product:{product.pk}",
        ADDR,
    )
    assert entry.detail["message"] == "Added."


def test_a_periodic_task_changed_in_the_console_is_one_entry(client, settings):
    """django-celery-beat's own admin, behind a trusted proxy: the address is the one the
    proxy saw."""
    settings.TRUSTED_PROXY_COUNT = 1
    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    task = PeriodicTask.objects.create(
        name="nightly-report", task="sagas.tasks.sweep", interval=every, enabled=True
    )
    editor = _editor(
        "django_celery_beat.view_periodictask", "django_celery_beat.change_periodictask"
    )
    client.force_login(editor)
    response = client.post(
        f"/admin/django_celery_beat/periodictask/{task.pk}/change/",
        {
            "name": "nightly-report",
            "regtask": "",
            "task": "sagas.tasks.sweep",
            "enabled": "",  # switched off
            "description": "",
            "interval": str(every.pk),
            "args": "[]",
            "kwargs": "{}",
            "expire_seconds": "",
            "queue": "",
            "exchange": "",
            "routing_key": "",
            "priority": "",
            "headers": "{}",
        },
        REMOTE_ADDR="10.0.0.2",
        HTTP_X_FORWARDED_FOR="6.6.6.6, 198.51.100.30",
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    task.refresh_from_db()
    assert task.enabled is False
    entry = _only_entry()
    assert (entry.action, entry.actor, entry.target, entry.ip, entry.source) == (
        "object.changed",
        editor,
        f"django_celery_beat.periodictask:{task.pk}",
        "198.51.100.30",
        "admin",
    )
    assert "Enabled" in entry.detail["fields"]
    assert entry.detail["object"].startswith("nightly-report")


def test_a_bulk_delete_selected_is_one_entry_per_deleted_object(client):
    """Django writes these log entries in bulk, without post_save: each object still gets its
    entry (and only one) with who and from where."""
    a = User.objects.create_user("old-a")
    b = User.objects.create_user("old-b")
    User.objects.create_user("stays")
    editor = _editor("auth.view_user", "auth.delete_user")
    client.force_login(editor)
    response = client.post(
        "/admin/auth/user/",
        {"action": "delete_selected", "_selected_action": [str(a.pk), str(b.pk)], "post": "yes"},
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    assert not User.objects.filter(pk__in=[a.pk, b.pk]).exists()
    entries = AuditEntry.objects.order_by("target")
    assert [(e.action, e.target, e.actor, e.ip) for e in entries] == [
        ("object.deleted", f"auth.user:{pk}", editor, ADDR) for pk in sorted([a.pk, b.pk], key=str)
    ]
    assert sorted(e.detail["object"] for e in entries) == ["old-a", "old-b"]


def test_another_console_action_is_one_entry_naming_it_and_its_objects(client):
    """django-celery-beat's "Disable selected tasks" changes rows without a change form."""
    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    task = PeriodicTask.objects.create(name="t1", task="sagas.tasks.sweep", interval=every)
    editor = _editor(
        "django_celery_beat.view_periodictask", "django_celery_beat.change_periodictask"
    )
    client.force_login(editor)
    client.post(
        "/admin/django_celery_beat/periodictask/",
        {"action": "disable_tasks", "_selected_action": [str(task.pk)], "index": "0"},
        REMOTE_ADDR=ADDR,
    )
    task.refresh_from_db()
    assert task.enabled is False
    entry = _only_entry()
    assert (entry.action, entry.target, entry.actor, entry.ip) == (
        "console.action",
        "django_celery_beat.periodictask",
        editor,
        ADDR,
    )
    assert entry.detail == {
        "model": "django_celery_beat.periodictask",
        "action": "disable_tasks",
        "objects": [str(task.pk)],
        "more": False,
    }


def test_a_saga_ops_action_is_recorded_once(client, ops_user):
    """Retry now writes its saga.retry entry; the console does not add a second one."""
    client.force_login(ops_user)
    saga = needs_manual()
    client.post(
        "/admin/sagas/saga/",
        {"action": "retry_now", "_selected_action": [str(saga.pk)], "index": "0"},
        REMOTE_ADDR=ADDR,
    )
    assert _only_entry().action == "saga.retry"


def test_a_token_revoked_in_the_console_is_recorded_once(client):
    """Revoking deletes the token: one token.revoked entry, no object.deleted, no
    console.action."""
    owner = User.objects.create_user("tess")
    token, _ = AuthToken.objects.create(user=owner)
    editor = _editor("knox.view_authtoken", "knox.delete_authtoken")
    client.force_login(editor)
    response = client.post(
        "/admin/knox/authtoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    assert not AuthToken.objects.filter(pk=token.pk).exists()
    entry = _only_entry()
    assert (entry.action, entry.ip) == ("token.revoked", ADDR)


def test_deleting_a_lockout_in_the_console_is_recorded_once(client):
    """An active lockout's deletion is login.unlocked; an attempt that locks nothing is
    object.deleted."""
    now = timezone.now()
    locked = AccessAttempt.objects.create(
        username="lou",
        ip_address="192.0.2.5",
        user_agent="ua",
        failures_since_start=settings.AXES_FAILURE_LIMIT,
        attempt_time=now,
    )
    # One failure, locking nothing. (An expired row would not reach the action at all:
    # django-axes deletes expired attempts itself on every request.)
    stale = AccessAttempt.objects.create(
        username="stan", ip_address="192.0.2.6", user_agent="ua", failures_since_start=1
    )
    editor = _editor("axes.view_accessattempt", "axes.delete_accessattempt")
    client.force_login(editor)
    response = client.post(
        "/admin/axes/accessattempt/",
        {
            "action": "delete_selected",
            "_selected_action": [str(locked.pk), str(stale.pk)],
            "post": "yes",
        },
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    assert not AccessAttempt.objects.exists()
    entries = {e.action: e for e in AuditEntry.objects.all()}
    assert AuditEntry.objects.count() == 2
    assert entries["login.unlocked"].target == "user:lou"
    assert entries["login.unlocked"].actor == editor  # who deleted it, not "system"
    assert entries["object.deleted"].target == f"axes.accessattempt:{stale.pk}"
    assert {e.ip for e in entries.values()} == {ADDR}


def test_deleting_one_row_of_an_address_locked_under_many_names_is_recorded(client):
    """The address stays locked by the others, so no login.unlocked: the deletion itself is
    the entry."""
    now = timezone.now()
    rows = [
        AccessAttempt.objects.create(
            username=f"guess-{i}",
            ip_address="192.0.2.7",
            user_agent="ua",
            failures_since_start=1,
            attempt_time=now,
        )
        for i in range(settings.AXES_FAILURE_LIMIT + 1)
    ]
    editor = _editor("axes.view_accessattempt", "axes.delete_accessattempt")
    client.force_login(editor)
    response = client.post(
        "/admin/axes/accessattempt/",
        {"action": "delete_selected", "_selected_action": [str(rows[0].pk)], "post": "yes"},
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    assert [(e.action, e.target) for e in AuditEntry.objects.all()] == [
        ("object.deleted", f"axes.accessattempt:{rows[0].pk}")
    ]


def _attempt(username: str, ip: str, agent: str, failures: int) -> AccessAttempt:
    return AccessAttempt.objects.create(
        username=username, ip_address=ip, user_agent=agent, failures_since_start=failures
    )


def _delete_in_console(client, *rows: AccessAttempt):
    client.force_login(_editor("axes.view_accessattempt", "axes.delete_accessattempt"))
    response = client.post(
        "/admin/axes/accessattempt/",
        {
            "action": "delete_selected",
            "_selected_action": [str(r.pk) for r in rows],
            "post": "yes",
        },
        REMOTE_ADDR=ADDR,
    )
    assert response.status_code == 302, response.content
    return [(e.action, e.target) for e in AuditEntry.objects.all()]


def test_deleting_one_of_two_rows_that_each_lock_a_user_out_is_a_deletion(client):
    """The other row (another browser of the same guesser) keeps the lockout: nothing was
    unlocked, and the deletion is still recorded."""
    first = _attempt("admin", "192.0.2.8", "ua1", 9)
    _attempt("admin", "192.0.2.8", "ua2", 9)
    assert _delete_in_console(client, first) == [
        ("object.deleted", f"axes.accessattempt:{first.pk}")
    ]


def test_deleting_the_row_that_lifts_a_lockout_counted_over_two_addresses_is_one_entry(client):
    three = _attempt("lou", "192.0.2.9", "ua", 3)
    _attempt("lou", "192.0.2.10", "ua", 2)
    assert _delete_in_console(client, three) == [("login.unlocked", "user:lou")]


def test_deleting_one_attempt_from_its_own_page_is_recorded_once(client):
    locking = _attempt("lee", "192.0.2.11", "ua", settings.AXES_FAILURE_LIMIT)
    single = _attempt("sid", "192.0.2.12", "ua", 1)
    client.force_login(_editor("axes.view_accessattempt", "axes.delete_accessattempt"))
    for row in (locking, single):
        page = f"/admin/axes/accessattempt/{row.pk}/delete/"
        assert client.post(page, {"post": "yes"}, REMOTE_ADDR=ADDR).status_code == 302
    assert [(e.action, e.target) for e in AuditEntry.objects.order_by("id")] == [
        ("login.unlocked", "user:lee"),
        ("object.deleted", f"axes.accessattempt:{single.pk}"),
    ]


def test_forgetting_expired_attempts_asks_nothing_per_row(django_assert_max_num_queries):
    """django-axes deletes expired attempts on every login and logout: the unlock audit must
    not look each one up (two aggregate queries a row, on the login path)."""
    old = timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(minutes=1)
    AccessAttempt.objects.bulk_create(
        AccessAttempt(
            username=f"u{i}",
            ip_address=f"192.0.2.{i}",
            user_agent="ua",
            failures_since_start=settings.AXES_FAILURE_LIMIT,
            attempt_time=old,
        )
        for i in range(40)
    )
    AccessAttempt.objects.update(attempt_time=old)  # the field is auto_now_add
    with django_assert_max_num_queries(5):
        deleted, _ = AccessAttempt.objects.filter(attempt_time__lte=old).delete()
    assert deleted == 40
    assert not AuditEntry.objects.exists()


def test_a_product_created_and_changed_through_the_api_by_staff(staff_api):
    """Each write is one entry: the staff member, the product, the fields, the address and
    the API as the channel; a change that changes nothing leaves no entry."""
    response = staff_api.post(
        "/api/v1/products/",
        {"sku": "pen", "name": "Pen", "price": "1.05", "stock_on_hand": 7},
        format="json",
        REMOTE_ADDR="192.0.2.40",
    )
    assert response.status_code == 201, response.content
    product = Product.objects.get(sku="pen")
    entry = _only_entry()
    assert (entry.action, entry.actor, entry.target, entry.ip, entry.source) == (
        "object.added",
        staff_api.user,
        f"inventory.product:{product.pk}",
        "192.0.2.40",
        "api",
    )
    assert entry.detail["object"] == "pen (Pen)"
    entry.delete()

    response = staff_api.patch(
        "/api/v1/products/pen/",
        {"name": "Pen", "price": "1.10", "stock_on_hand": 9},
        format="json",
        REMOTE_ADDR="192.0.2.41",
    )
    assert response.status_code == 200, response.content
    entry = _only_entry()
    assert (entry.action, entry.actor, entry.target, entry.ip, entry.source) == (
        "object.changed",
        staff_api.user,
        f"inventory.product:{product.pk}",
        "192.0.2.41",
        "api",
    )
    assert entry.detail["fields"] == ["Price", "Stock on hand"]
    assert entry.detail["message"] == "Changed Price and Stock on hand."
    entry.delete()

    unchanged = staff_api.patch("/api/v1/products/pen/", {"name": "Pen"}, format="json")
    assert unchanged.status_code == 200, unchanged.content
    assert not AuditEntry.objects.exists()
