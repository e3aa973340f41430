"""API tokens: a client revokes its own, staff revoke anyone's in the ops console, both go to
the audit log; tokens from before hashing keep working, now stored hashed."""

from __future__ import annotations

import importlib
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.utils import timezone
from knox.crypto import hash_token
from knox.models import AuthToken

from audit.models import AuditEntry
from tests.api.conftest import api_client_for, assert_error

pytestmark = pytest.mark.django_db

TOKEN_URL = "/api/v1/auth/token/"


def test_a_client_sees_when_its_token_expires(django_user_model):
    api = api_client_for(django_user_model.objects.create_user("ada"))
    body = api.get(TOKEN_URL).json()
    assert body["user"] == "ada"
    assert api.token.startswith(body["token"])
    expiry = timezone.datetime.fromisoformat(body["expiry"])
    assert timedelta(days=89) < expiry - timezone.now() <= timedelta(days=90)


def test_a_client_revokes_its_own_token_and_keeps_its_others(django_user_model):
    """DELETE /auth/token/: 204, that token is gone from the database and refused from then on;
    the user's other token still works; the audit log says who, what and from where."""
    user = django_user_model.objects.create_user("ada")
    api = api_client_for(user)
    spare = api_client_for(user)

    response = api.delete(TOKEN_URL, REMOTE_ADDR="198.51.100.20")
    assert response.status_code == 204, response.content
    assert not AuthToken.objects.filter(digest=hash_token(api.token)).exists()
    assert_error(api.get("/api/v1/products/"), 401, "authentication_failed")
    assert spare.get("/api/v1/products/").status_code == 200

    entry = AuditEntry.objects.get(action="token.revoked")
    assert (entry.actor, entry.target, entry.ip, entry.source) == (
        user,
        "user:ada",
        "198.51.100.20",
        "api",
    )
    assert api.token.startswith(entry.detail["token"])


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ("{bad", "application/json", 400, "parse_error"),
        ("revoke", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_a_revoke_with_a_body_that_is_not_json_is_refused_and_revokes_nothing(
    django_user_model, body, content_type, status, code
):
    """Like every action that takes no body: a body that is not JSON is refused, and the token
    stays."""
    api = api_client_for(django_user_model.objects.create_user("ada"))
    refused = api.generic("DELETE", TOKEN_URL, body, content_type=content_type)
    assert_error(refused, status, code)
    assert AuthToken.objects.filter(digest=hash_token(api.token)).exists()
    assert api.get("/api/v1/products/").status_code == 200


def test_revoking_without_a_token_is_a_400(client, django_user_model):
    """A browsable-API session has no token to revoke: a 400 in the one error shape."""
    client.force_login(django_user_model.objects.create_user("ada"))
    response = client.delete(TOKEN_URL)
    assert response.status_code == 400
    assert response.json()["code"] == "no_token"


def test_staff_revoke_a_clients_token_in_the_ops_console(client, django_user_model):
    """The token list shows who holds which token and until when (never the token); the
    "revoke" action deletes it, and the audit log names the staff member."""
    victim = django_user_model.objects.create_user("mallory-victim")
    api = api_client_for(victim)
    staff = User.objects.create_user("sue", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_authtoken", "delete_authtoken"])
    )
    client.force_login(staff)

    page = client.get("/admin/knox/authtoken/")
    assert page.status_code == 200
    assert b"mallory-victim" in page.content
    assert api.token.encode() not in page.content
    token = AuthToken.objects.get(user=victim)
    response = client.post(
        "/admin/knox/authtoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
        REMOTE_ADDR="192.0.2.44",
        follow=True,
    )
    assert b"Revoked 1 token" in response.content
    assert not AuthToken.objects.filter(user=victim).exists()
    assert api.get("/api/v1/products/").status_code == 401
    entry = AuditEntry.objects.get(action="token.revoked")
    assert (entry.actor_name, entry.target, entry.ip, entry.source) == (
        "sue",
        "user:mallory-victim",
        "192.0.2.44",
        "admin",
    )


@pytest.mark.parametrize("lookup", ["token_key__startswith", "digest__startswith", "token_key"])
def test_the_token_list_filters_by_no_part_of_a_token(client, django_user_model, lookup):
    """The console shows a token's first 8 characters; URL filters on its stored columns
    (knox keeps 15 in clear, and the digest) are refused whether the guess is right or wrong,
    never a list that holds the token only when it is right."""
    api = api_client_for(django_user_model.objects.create_user("ada"))
    token = AuthToken.objects.get(user__username="ada")
    right = {"token_key__startswith": api.token[:12], "digest__startswith": token.digest[:12]}
    right_guess = right.get(lookup, token.token_key)
    staff = User.objects.create_user("sue", password="pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_authtoken"))
    client.force_login(staff)
    assert b"ada" in client.get("/admin/knox/authtoken/").content
    for guess in (right_guess, "0" * len(right_guess)):
        answer = client.get("/admin/knox/authtoken/", {lookup: guess})
        assert answer.status_code == 400 and b"ada" not in answer.content


def test_tokens_from_before_hashing_keep_working_and_lose_their_clear_text(django_user_model):
    """The migration turns each clear-text DRF token into a knox digest: the same string still
    authenticates (now with an expiry), and the clear-text row is gone."""
    user = django_user_model.objects.create_user("legacy")
    old_key = "0123456789abcdef0123456789abcdef01234567"  # DRF's format: 40 hex characters
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, "
            "created timestamptz NOT NULL, user_id integer NOT NULL UNIQUE)"
        )
        cursor.execute("INSERT INTO authtoken_token VALUES (%s, now(), %s)", [old_key, user.pk])
    migration = importlib.import_module("accounts.migrations.0001_hash_legacy_drf_tokens")
    from django.apps import apps

    with connection.schema_editor() as editor:
        migration.hash_legacy_tokens(apps, editor)

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM authtoken_token")
        assert cursor.fetchone()[0] == 0
    stored = AuthToken.objects.get(user=user)
    assert stored.digest == hash_token(old_key) and old_key != stored.digest
    assert stored.expiry > timezone.now() + timedelta(days=89)
    api = api_client_for(None)
    api.credentials(HTTP_AUTHORIZATION=f"Token {old_key}")
    assert api.get("/api/v1/products/").status_code == 200


def test_no_console_address_carries_a_tokens_digest(client):
    """The digest is the stored token's lookup key: the list links no page of one token, and
    the addresses such a page had (keyed by the digest) are no page at all, so a digest never
    reaches an address bar, a browser's history or an access log. The list still revokes."""
    victim = User.objects.create_user("bob-client")
    api = api_client_for(victim)
    staff = User.objects.create_user("sue", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_authtoken", "delete_authtoken"])
    )
    client.force_login(staff)
    digest = AuthToken.objects.get(user=victim).digest

    for path in ("/admin/knox/authtoken/", "/admin/knox/authtoken/?q=bob-client", "/admin/"):
        page = client.get(path)
        assert page.status_code == 200
        addresses = re.findall(r'(?:href|action|src)="([^"]*)"', page.content.decode())
        assert addresses and not [a for a in addresses if digest[:16] in a], addresses
    assert b"bob-client" in client.get("/admin/knox/authtoken/").content

    for page in ("change/", "delete/", "history/", ""):
        assert client.get(f"/admin/knox/authtoken/{digest}/{page}").status_code == 404
    gone = client.post(f"/admin/knox/authtoken/{digest}/delete/", {"post": "yes"})
    assert gone.status_code == 404
    assert api.get("/api/v1/products/").status_code == 200  # still valid

    response = client.post(
        "/admin/knox/authtoken/",
        {"action": "revoke", "_selected_action": [digest]},
        REMOTE_ADDR="192.0.2.45",
    )
    assert response.status_code == 302 and digest[:16] not in response["Location"]
    assert api.get("/api/v1/products/").status_code == 401
    entry = AuditEntry.objects.get(action="token.revoked")
    assert (entry.actor_name, entry.target, entry.ip) == ("sue", "user:bob-client", "192.0.2.45")
