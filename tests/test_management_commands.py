"""issue_token prints only a new token, stored hashed, expiring; seed_demo is idempotent."""

from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone
from knox.crypto import hash_token
from knox.models import AuthToken
from rest_framework.test import APIClient

from audit.models import AuditEntry
from inventory.models import Product


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def api_status(token: str) -> int:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client.get("/api/v1/products/").status_code


@pytest.mark.django_db
def test_issue_token_creates_the_user_and_prints_only_a_new_token_each_time():
    """The only output is a token; a second run prints another one, and both work."""
    first = run("issue_token", "alice")
    second = run("issue_token", "alice")

    assert first.endswith("\n") and first.count("\n") == 1
    assert first != second
    assert api_status(first.strip()) == 200
    assert api_status(second.strip()) == 200
    user = get_user_model().objects.get(username="alice")
    assert get_user_model().objects.filter(username="alice").count() == 1
    assert AuthToken.objects.filter(user=user).count() == 2
    assert not user.is_staff
    assert not user.has_usable_password()


@pytest.mark.django_db
def test_issue_token_stores_only_a_digest_and_an_expiry():
    """Read back from the database: no column holds the token, the digest is its SHA-512, the
    lookup prefix is a short head of it, and it expires after 90 days (or --expires-days)."""
    token = run("issue_token", "carol").strip()
    short = run("issue_token", "carol", "--expires-days", "7").strip()

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.digest, t.token_key, t.expiry FROM knox_authtoken t "
            "JOIN auth_user u ON u.id = t.user_id WHERE u.username = 'carol' ORDER BY t.expiry"
        )
        rows = cursor.fetchall()
        cursor.execute("SELECT * FROM knox_authtoken")
        every_value = [str(v) for row in cursor.fetchall() for v in row]
    assert len(rows) == 2
    assert not any(token in v or short in v for v in every_value)
    (short_digest, short_key, short_expiry), (digest, key, expiry) = rows
    assert digest == hash_token(token) and len(digest) == 128
    assert short_digest == hash_token(short)
    assert token.startswith(key) and len(key) == 15 < len(token) == 64
    now = timezone.now()
    assert timedelta(days=89) < expiry - now <= timedelta(days=90)
    assert timedelta(days=6) < short_expiry - now <= timedelta(days=7)
    issued = AuditEntry.objects.filter(action="token.issued", target="user:carol")
    assert issued.count() == 2 and {e.source for e in issued} == {"cli"}


@pytest.mark.django_db
def test_a_demo_token_revokes_the_users_earlier_demo_tokens_only():
    """`issue_token USER --demo` (what make run prints) revokes USER's earlier demo tokens, each
    revocation in the audit log, and leaves USER's other tokens and other users' demo tokens
    valid: exactly one demo token per user is live."""
    own = run("issue_token", "erin").strip()
    first = run("issue_token", "erin", "--demo").strip()
    neighbour = run("issue_token", "frank", "--demo").strip()
    second = run("issue_token", "erin", "--demo").strip()

    assert first.startswith("demo_") and second.startswith("demo_")
    assert api_status(first) == 401
    assert [api_status(t) for t in (second, own, neighbour)] == [200, 200, 200]
    erin = get_user_model().objects.get(username="erin")
    assert AuthToken.objects.filter(user=erin).count() == 2
    [revoked] = AuditEntry.objects.filter(action="token.revoked", target="user:erin")
    assert revoked.detail == {"token": first[:8], "reason": "replaced by a new demo token"}
    assert revoked.actor_name == "cli"


@pytest.mark.django_db
def test_a_demo_token_says_on_stderr_how_many_it_revoked_and_only_then():
    """A client may still hold the token a demo token replaces (another make run on the same
    database): the run that revokes it says so. make run printed "the last run's is revoked"
    on its first run too, when there was none; stdout stays the token alone."""

    def demo() -> tuple[str, str]:
        out, err = StringIO(), StringIO()
        call_command("issue_token", "gina", "--demo", stdout=out, stderr=err)
        return out.getvalue(), err.getvalue()

    first, first_note = demo()
    second, second_note = demo()

    assert first_note == ""
    assert second_note.startswith("Revoked 1 earlier demo token of gina: a client still using")
    assert "401" in second_note
    assert [first.count("\n"), second.count("\n")] == [1, 1]
    assert [api_status(first.strip()), api_status(second.strip())] == [401, 200]


@pytest.mark.django_db
def test_an_expired_token_is_refused_and_removed():
    token = run("issue_token", "dave", "--expires-days", "1").strip()
    AuthToken.objects.update(expiry=timezone.now() - timedelta(seconds=1))
    assert api_status(token) == 401
    assert not AuthToken.objects.exists()


@pytest.mark.django_db
def test_issue_token_staff_makes_ops_staff_who_may_operate_sagas():
    """--staff sets is_staff and adds the "ops" group, which carries sagas.operate_saga."""
    run("issue_token", "bob")
    key = run("issue_token", "bob", "--staff").strip()

    user = get_user_model().objects.get(username="bob")
    assert AuthToken.objects.filter(user=user, digest=hash_token(key)).exists()
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
    login = client.post(
        "/admin/login/",
        {"username": "demo-staff", "password": "demo-staff-password", "next": "/admin/"},
    )
    assert login.status_code == 302, login.content[:300]
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_seed_demo_again_keeps_the_demo_login_signed_in(client):
    """A rerun (each `make run`) leaves an unchanged password as it is: the ops console
    session of the demo login survives it. A changed one is set back to the printed one."""
    run("seed_demo")
    login = client.post(
        "/admin/login/",
        {"username": "demo-staff", "password": "demo-staff-password", "next": "/admin/"},
    )
    assert login.status_code == 302, login.content[:300]
    run("seed_demo")
    assert client.get("/admin/").status_code == 200  # still signed in

    staff = get_user_model().objects.get(username="demo-staff")
    staff.set_password("another-long-passphrase-42")
    staff.save()
    run("seed_demo")
    staff.refresh_from_db()
    assert staff.check_password("demo-staff-password")


@pytest.mark.django_db
def test_seed_demo_keeps_stock_levels_it_finds():
    """Stock that moved since the first run (orders, restocks) is not reset by a rerun."""
    run("seed_demo")
    Product.objects.filter(sku="SR-MUG").update(stock_on_hand=7)

    run("seed_demo")

    assert Product.objects.get(sku="SR-MUG").stock_on_hand == 7


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (("",), "Not a valid username"),
        (("bad user name!",), "Not a valid username"),
        (("x" * 151,), "Not a valid username"),
        (("alice", "--expires-days", "0"), "between 1 and 3650"),
        (("alice", "--expires-days", "99999999"), "between 1 and 3650"),
    ],
)
def test_issue_token_refuses_a_bad_username_or_lifetime_and_creates_nobody(args, message):
    with pytest.raises(CommandError, match=message):
        run("issue_token", *args)
    assert not get_user_model().objects.exists()
    assert not AuthToken.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_issue_token_run_as_a_user_runs_it_writes_the_token_and_its_audit_line_only():
    """``TOKEN=$(manage.py issue_token alice)`` in a terminal: the token on stdout, and on
    stderr only the audit line of the issue. Every process logged django-axes' "AXES: BEGIN
    version ..." line as it started, which landed on the terminal of every management
    command."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, _worker_env

    done = subprocess.run(
        [sys.executable, "manage.py", "issue_token", "alice"],
        cwd=REPO_ROOT,
        env=_worker_env({"LOG_FORMAT": "json"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and api_status(done.stdout.strip()) == 200
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["event"], line.get("action")) for line in lines] == [("audit", "token.issued")]
