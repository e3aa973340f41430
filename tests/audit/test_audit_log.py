"""The audit log: ops actions on sagas land in it with who, what, when and from where, and
staff read it (and only read it) in the ops console."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission

from audit.models import AuditEntry
from audit.services import audit_record
from sagas.models import SagaState
from tests.admin.conftest import needs_manual, running

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"


def test_an_admin_ops_action_is_an_audit_entry_with_the_operator_and_address(client, ops_user):
    """Retry now from the saga list: one entry naming the operator, the saga, the admin as the
    channel and the address the request came from."""
    client.force_login(ops_user)
    saga = needs_manual()
    client.post(
        LIST,
        {"action": "retry_now", "_selected_action": [str(saga.pk)], "index": "0"},
        REMOTE_ADDR="203.0.113.9",
    )
    saga.refresh_from_db()
    assert saga.state == SagaState.COMPENSATING
    entry = AuditEntry.objects.get(action="saga.retry")
    assert (entry.actor, entry.actor_name, entry.target) == (
        ops_user,
        "ops-olga",
        f"saga:{saga.pk}",
    )
    assert (entry.ip, entry.source) == ("203.0.113.9", "admin")
    assert entry.at is not None


def test_behind_a_trusted_proxy_the_address_is_the_one_the_proxy_saw(client, ops_user, settings):
    """With one trusted proxy the client address is the last X-Forwarded-For hop; hops a
    client wrote itself further left are ignored."""
    settings.TRUSTED_PROXY_COUNT = 1
    client.force_login(ops_user)
    saga = needs_manual()
    client.post(
        LIST,
        {"action": "retry_now", "_selected_action": [str(saga.pk)], "index": "0"},
        REMOTE_ADDR="10.0.0.2",
        HTTP_X_FORWARDED_FOR="6.6.6.6, 198.51.100.4",
    )
    assert AuditEntry.objects.get(action="saga.retry").ip == "198.51.100.4"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        # Fewer hops than proxies: the header did not come through them all, and its leftmost
        # hop is the client's own writing; the peer's address counts.
        ("6.6.6.6", "10.0.0.2"),
        ("", "10.0.0.2"),
        # The hop the outermost trusted proxy saw is no address at all.
        ("6.6.6.6, not-an-address, 198.51.100.4", "10.0.0.2"),
        ("6.6.6.6, 203.0.113.9, 198.51.100.4", "203.0.113.9"),
        ("2001:DB8::1, 198.51.100.4", "2001:db8::1"),
    ],
)
def test_behind_two_trusted_proxies_a_client_cannot_choose_its_address(
    rf, settings, forwarded, expected
):
    """With two proxies a client reaching the nearer one directly sent one hop of its own
    choosing, and that hop was taken: anyone could pick the address its rate limit, login
    lockout and audit entries went by."""
    from audit.context import client_ip

    settings.TRUSTED_PROXY_COUNT = 2
    request = rf.get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip(request) == expected


def test_an_api_ops_action_is_an_audit_entry_from_the_api(ops_user):
    from tests.api.conftest import api_client_for

    saga = needs_manual()
    api = api_client_for(ops_user)
    response = api.post(f"/api/v1/sagas/{saga.pk}/retry/", REMOTE_ADDR="192.0.2.1")
    assert response.status_code == 202, response.content
    entry = AuditEntry.objects.get(action="saga.retry")
    assert (entry.actor_name, entry.ip, entry.source) == ("ops-olga", "192.0.2.1", "api")


def test_staff_read_the_audit_log_in_the_console_and_cannot_change_it(client, ops_user):
    """A staff member with the view permission sees entries in the list and on their page;
    there is no add, change or delete."""
    audit_record("token.revoked", actor_name="someone", target="user:alice")
    entry = AuditEntry.objects.get()
    ops_user.user_permissions.add(Permission.objects.get(codename="view_auditentry"))
    client.force_login(ops_user)
    page = client.get("/admin/audit/auditentry/")
    assert page.status_code == 200
    assert b"token.revoked" in page.content and b"user:alice" in page.content
    assert client.get(f"/admin/audit/auditentry/{entry.pk}/change/").status_code == 200
    assert client.get("/admin/audit/auditentry/add/").status_code == 403
    assert client.post(f"/admin/audit/auditentry/{entry.pk}/delete/").status_code == 403
    assert AuditEntry.objects.count() == 1


def test_a_command_records_cli_with_no_address():
    entry = audit_record("token.issued", actor_name="cli", target="user:bob")
    assert (entry.source, entry.ip, entry.actor) == ("cli", None, None)


@pytest.mark.parametrize(
    ("route", "body", "action", "said"),
    [
        ("compensate", {"reason": "fraud suspected"}, "saga.compensate", "fraud suspected"),
        (
            "resolve",
            {"note": "refunded by phone", "accept_effects": True},
            "saga.resolve",
            "refunded by phone",
        ),
        ("undo-done", {"step": "s1", "note": "voided by hand"}, "saga.undo_done", "voided by hand"),
    ],
)
def test_every_ops_action_of_the_api_is_an_audit_entry(ops_user, route, body, action, said):
    """Compensate, resolve and undo-done (retry above) each leave one entry: the operator, the
    saga, the address, the channel and what they wrote."""
    from tests.api.conftest import api_client_for

    saga = running() if route == "compensate" else needs_manual()
    api = api_client_for(ops_user)
    response = api.post(
        f"/api/v1/sagas/{saga.pk}/{route}/", body, format="json", REMOTE_ADDR="192.0.2.7"
    )
    assert response.status_code in (200, 202), response.content
    entry = AuditEntry.objects.get(action=action)
    assert (entry.actor, entry.target, entry.ip, entry.source) == (
        ops_user,
        f"saga:{saga.pk}",
        "192.0.2.7",
        "api",
    )
    assert said in entry.detail["note"]


def test_an_ops_note_is_kept_whole_in_the_audit_entry(ops_user):
    """A note as long as the timeline takes (2,000 characters) is the audit entry's note, not
    its first 500 characters: the audit log is where who said what is looked up later."""
    from sagas.services import NOTE_MAX
    from tests.api.conftest import api_client_for

    saga = running()
    reason = ("refund approved by the shift lead after the client called; " * 40)[:NOTE_MAX]
    response = api_client_for(ops_user).post(
        f"/api/v1/sagas/{saga.pk}/compensate/", {"reason": reason}, format="json"
    )
    assert response.status_code == 202, response.content
    entry = AuditEntry.objects.get(action="saga.compensate")
    assert reason in entry.detail["note"]
