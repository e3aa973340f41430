"""The ops console resists guessing: password rules, and lockout after repeated failed logins
per user name or per address, recorded in the audit log, visible to staff, undone by the unlock
command."""

from __future__ import annotations

import logging
from io import StringIO

import pytest
from axes.models import AccessAttempt, AccessLog
from django.contrib.auth.models import Permission, User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from audit.models import AuditEntry

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/"


def login(client, username: str, password: str, ip: str = "198.51.100.7"):
    return client.post(
        LOGIN, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=ip
    )


@pytest.fixture
def demo_staff(settings) -> User:
    call_command("seed_demo", stdout=StringIO())
    return User.objects.get(username="demo-staff")


@pytest.mark.parametrize(
    ("minutes", "words"), [(0.5, "for 30 seconds"), (1, "for 60 seconds"), (2.5, "for 2 minutes")]
)
def test_the_lockout_page_says_how_long_in_words(client, demo_staff, settings, minutes, words):
    """A fractional LOGIN_LOCKOUT_MINUTES reads as seconds or whole minutes, never '0 minutes'."""
    from datetime import timedelta

    settings.AXES_COOLOFF_TIME = timedelta(minutes=minutes)
    for _ in range(settings.AXES_FAILURE_LIMIT):
        locked = login(client, "demo-staff", "wrong-guess")
    assert locked.status_code == 429
    assert f"locked {words}." in " ".join(locked.content.decode().split())


def test_five_failures_lock_the_user_out_even_with_the_right_password(
    client, demo_staff, settings, caplog
):
    caplog.set_level(logging.INFO, logger="audit.services")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "demo-staff", "wrong-guess").status_code == 200  # the form again
    locked = login(client, "demo-staff", "wrong-guess")
    assert locked.status_code == 429
    assert b"Too many failed logins" in locked.content
    page = " ".join(locked.content.decode().split())
    assert "locked for 15 minutes" in page and "PT15M" not in page  # LOGIN_LOCKOUT_MINUTES
    assert "sagarunner ops console" in page and "Django administration" not in page
    assert login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD).status_code == 429
    # From another address too: the lock is on the user name.
    assert (
        login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="192.0.2.99").status_code
        == 429
    )

    entry = AuditEntry.objects.get(action="login.locked_out")
    assert (entry.target, entry.ip, entry.source) == ("user:demo-staff", "198.51.100.7", "login")
    # Logged too (one structured line for the log pipeline), once for this lockout.
    logged = [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("action") == "login.locked_out"
    ]
    assert len(logged) == 1 and logged[0]["target"] == "user:demo-staff", logged
    assert logged[0]["ip"] == "198.51.100.7"


def test_failures_from_one_address_lock_that_address_for_every_user(client, demo_staff, settings):
    for i in range(settings.AXES_FAILURE_LIMIT):
        login(client, f"guess-{i}", "wrong-guess", ip="203.0.113.66")
    response = login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="203.0.113.66")
    assert response.status_code == 429
    ok = login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="203.0.113.67")
    assert ok.status_code == 302


def test_failures_from_one_ipv6_network_lock_all_of_it(client, demo_staff, settings):
    """Each failure from another address of one /64 (which its holder picks at will) counted
    for that address alone: five more password checks per address, without end. Counted by the
    /64, the sixth address of it is locked too; another /64 is not."""
    for i in range(settings.AXES_FAILURE_LIMIT):
        login(client, f"guess-{i}", "wrong-guess", ip=f"2001:db8:7:1::{i + 1:x}")
    response = login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="2001:db8:7:1::99")
    assert response.status_code == 429
    ok = login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="2001:db8:7:2::1")
    assert ok.status_code == 302


def test_a_login_under_one_name_does_not_clear_anothers_failures_from_that_address(
    client, demo_staff, settings
):
    """A staff member guessing a colleague's password from their own desk cannot reset the
    count by logging in as themself in between: the guesses stand, and the colleague's name
    is locked after the limit, the right password included."""
    User.objects.create_user("colleague", password="colleague-password-42", is_staff=True)
    ip = "198.51.100.40"
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "colleague", "a-guess", ip=ip).status_code == 200
    assert login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip=ip).status_code == 302
    client.logout()
    assert login(client, "colleague", "a-guess", ip=ip).status_code == 429  # the limit's guess
    locked = login(client, "colleague", "colleague-password-42", ip="192.0.2.10")
    assert locked.status_code == 429


def test_a_right_password_from_a_locked_address_is_audited_on_the_address_not_the_user(
    client, demo_staff, settings
):
    """demo-staff never failed: the entry of the refused login names the locked address."""
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(client, "mallory", "wrong-guess", ip="203.0.113.70")
    assert (
        login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="203.0.113.70").status_code
        == 429
    )
    entries = {e.target: e for e in AuditEntry.objects.filter(action="login.locked_out")}
    assert set(entries) == {"user:mallory", "ip:203.0.113.70"}, entries
    assert entries["user:mallory"].detail["locked"] == ["ip:203.0.113.70", "user:mallory"]
    refused = entries["ip:203.0.113.70"]
    assert (refused.actor_name, refused.detail["locked"]) == ("demo-staff", ["ip:203.0.113.70"])


def test_unlocking_an_address_locked_by_failures_under_many_names_is_audited_once(
    client, demo_staff, settings
):
    for i in range(settings.AXES_FAILURE_LIMIT):
        login(client, f"guess-{i}", "wrong-guess", ip="203.0.113.71")
    call_command("axes_reset_ip", "203.0.113.71", stdout=StringIO())
    unlocked = AuditEntry.objects.get(action="login.unlocked")
    assert (unlocked.target, unlocked.source) == ("ip:203.0.113.71", "cli")
    assert unlocked.detail["failures"] == settings.AXES_FAILURE_LIMIT
    assert (
        login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD, ip="203.0.113.71").status_code
        == 302
    )


def test_staff_see_the_lockout_and_the_unlock_command_lifts_it(client, demo_staff, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(client, "demo-staff", "wrong-guess")
    assert AccessAttempt.objects.filter(username="demo-staff").exists()

    # Another staff member (demo permissions) sees who is locked out in the console.
    other = User.objects.create_user("sue", password="a-long-passphrase-9", is_staff=True)
    other.user_permissions.set(demo_staff.user_permissions.all())
    client.force_login(other)
    page = client.get("/admin/axes/accessattempt/")
    assert page.status_code == 200 and b"demo-staff" in page.content
    client.logout()

    call_command("axes_reset_username", "demo-staff", stdout=StringIO())
    assert login(client, "demo-staff", settings.DEMO_STAFF_PASSWORD).status_code == 302
    unlocked = AuditEntry.objects.get(action="login.unlocked")
    assert (unlocked.target, unlocked.source) == ("user:demo-staff", "cli")


def test_the_login_log_filters_by_no_session_digest(client):
    """Each row of django-axes' login log holds a digest of the session's key, which the page
    does not show; a URL filter on it is refused whether the guess is right or wrong."""
    AccessLog.objects.create(
        username="ada", ip_address="198.51.100.7", user_agent="ua", session_hash="ab" * 32
    )
    staff = User.objects.create_user("sue", password="a-long-passphrase-9", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_accesslog"))
    client.force_login(staff)
    assert b"198.51.100.7" in client.get("/admin/axes/accesslog/").content
    for guess in ("abab", "cdcd"):
        answer = client.get("/admin/axes/accesslog/", {"session_hash__startswith": guess})
        assert answer.status_code == 400 and b"198.51.100.7" not in answer.content
    # Its own filters and its date drill-down still work.
    assert client.get("/admin/axes/accesslog/", {"path_info": ""}).status_code == 200
    assert client.get("/admin/axes/accesslog/", {"attempt_time__year": "2020"}).status_code == 200


def test_password_rules_refuse_weak_passwords_and_the_demo_password_passes(demo_staff, settings):
    for weak in ("123", "password1234", "demostaff", "12345678901234"):
        with pytest.raises(ValidationError):
            validate_password(weak, demo_staff)
    validate_password(settings.DEMO_STAFF_PASSWORD, demo_staff)


def test_seed_demo_refuses_a_weak_demo_password(settings):
    settings.DEMO_STAFF_PASSWORD = "123"
    with pytest.raises(CommandError, match="password rules"):
        call_command("seed_demo", stdout=StringIO())


@pytest.mark.parametrize("length", [151, 256, 5000])
def test_a_user_name_longer_than_any_user_can_have_is_a_form_error(client, demo_staff, length):
    """Not a 500: django-axes recorded the failure under the name, and its column holds 255."""
    response = login(client, "a" * length, "wrong-guess")
    assert response.status_code == 200
    assert "at most 150 characters" in response.content.decode()
    assert not AccessAttempt.objects.filter(username__startswith="aaaa").exists()


def test_a_long_user_name_from_a_locked_out_address_is_a_form_error(client, demo_staff, settings):
    """The form refuses it before any backend (django-axes' among them) is asked."""
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(client, "demo-staff", "wrong-guess")
    response = login(client, "a" * 256, "wrong-guess")
    assert response.status_code == 200
    assert "at most 150 characters" in response.content.decode()
