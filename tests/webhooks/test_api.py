"""``/api/v1/webhooks/``: register, list, rotate, delete; refused URLs; the secret shown once."""

from __future__ import annotations

import socket
import time
from datetime import datetime

import pytest
from django.utils import timezone
from structlog.testing import capture_logs

from tests.api.conftest import assert_error
from webhooks import signing
from webhooks.models import Endpoint
from webhooks.security import UrlRefused, check_new_url, check_url

from .conftest import api_client_for

pytestmark = pytest.mark.django_db

BODY = {"url": "https://93.184.215.14/hooks", "events": ["order.confirmed"]}


def test_the_secret_is_shown_once_and_a_client_sees_only_its_own_endpoints(
    customer, other_customer
):
    client, other = api_client_for(customer), api_client_for(other_customer)
    created = client.post("/api/v1/webhooks/", BODY, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["secret"].startswith("whsec_") and body["events"] == ["order.confirmed"]
    assert created["Location"] == f"/api/v1/webhooks/{body['id']}/"

    listed = client.get("/api/v1/webhooks/").json()
    assert [e["id"] for e in listed["results"]] == [body["id"]]
    assert "secret" not in listed["results"][0]
    assert "secret" not in client.get(f"/api/v1/webhooks/{body['id']}/").json()

    assert other.get("/api/v1/webhooks/").json()["results"] == []
    assert_error(other.get(f"/api/v1/webhooks/{body['id']}/"), 404, "not_found")
    assert_error(other.delete(f"/api/v1/webhooks/{body['id']}/"), 404, "not_found")
    assert_error(client.get("/api/v1/webhooks/not-a-uuid/"), 404, "not_found")

    assert client.delete(f"/api/v1/webhooks/{body['id']}/").status_code == 204
    assert not Endpoint.objects.exists()


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://93.184.215.14/hooks", "https_required"),
        ("https://127.0.0.1/hooks", "private_address"),
        ("https://localhost/hooks", "private_address"),
        ("https://10.1.2.3/hooks", "private_address"),
        ("https://192.168.0.10/hooks", "private_address"),
        ("https://169.254.169.254/latest/meta-data/", "private_address"),
        ("https://[::1]/hooks", "private_address"),
        ("https://[::ffff:127.0.0.1]/hooks", "private_address"),
        # IPv6 forms that reach an IPv4 address: judged by that address.
        ("https://[64:ff9b::a9fe:a9fe]/hooks", "private_address"),  # NAT64 -> 169.254.169.254
        ("https://[64:ff9b::a00:1]/hooks", "private_address"),  # NAT64 -> 10.0.0.1
        ("https://[64:ff9b:1::a00:1]/hooks", "private_address"),  # local-use NAT64
        ("https://[2002:7f00:1::]/hooks", "private_address"),  # 6to4 -> 127.0.0.1
        ("https://[2002:a9fe:a9fe::]/hooks", "private_address"),  # 6to4 -> 169.254.169.254
        ("https://[::127.0.0.1]/hooks", "private_address"),  # IPv4-compatible
        ("https://[::ffff:0:a9fe:a9fe]/hooks", "private_address"),  # IPv4-translated (SIIT)
        ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hooks", "private_address"),  # Teredo
        ("https://[fec0::1]/hooks", "private_address"),  # site-local (deprecated, still routed)
        ("https://[feff:ffff::1]/hooks", "private_address"),  # the top of fec0::/10
        ("https://[fec0::5db8:d70e]/hooks", "private_address"),  # never judged by its low bits
        # Internationalised names that have no IDNA 2008 form.
        ("https://\u2603.example/hooks", "invalid_url"),  # a snowman: no letter of any script
        ("https://b\u00fccher_shop.example/hooks", "invalid_url"),  # an underscore beside an IDN
        ("https://" + "\u00fc" * 64 + ".example/hooks", "invalid_url"),  # a label too long
        ("https://93.184.215.14/a\r\nX-Injected: 1", "invalid_url"),
        ("https://93.184.215.14/a b", "invalid_url"),
        ("https://93.184.215.14/\u202egnp.exe", "invalid_url"),  # right-to-left override
        ("https://user:pw@93.184.215.14/hooks", "invalid_url"),
        ("https://93.184.215.14:0/hooks", "invalid_url"),
        ("https://93.184.215.14:99999/hooks", "invalid_url"),
        ("not a url", "invalid_url"),
        ("93.184.215.14/hooks", "invalid_url"),
        ("ftp://93.184.215.14/hooks", "https_required"),
    ],
)
def test_unsafe_urls_are_refused_at_registration(customer, settings, url, code):
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    client = api_client_for(customer)
    body = assert_error(client.post("/api/v1/webhooks/", {**BODY, "url": url}, format="json"), 400)
    assert body["code"] == code, body
    assert "url" in body["fields"]
    assert not Endpoint.objects.exists()


def test_a_refused_address_is_logged_and_not_told_to_the_client(customer, settings, monkeypatch):
    """The client is told which host was refused, never the internal address behind it; staff
    find that address in the log."""
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "intranet.shop.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.30.40", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    client = api_client_for(customer)
    with capture_logs() as logs:
        answers = [
            assert_error(client.post("/api/v1/webhooks/", {**BODY, "url": url}, format="json"), 400)
            for url in ("https://intranet.shop.example/hooks", "https://localhost/hooks")
        ]
    assert [a["code"] for a in answers] == ["private_address", "private_address"]
    assert "intranet.shop.example" in answers[0]["detail"]
    assert "localhost" in answers[1]["detail"]
    for told in map(str, answers):
        assert "10.20.30.40" not in told and "127.0.0.1" not in told and "::1" not in told
    refused = [line for line in logs if line["event"] == "webhooks.url_refused"]
    assert (refused[0]["host"], refused[0]["address"]) == ("intranet.shop.example", "10.20.30.40")
    assert refused[1]["host"] == "localhost" and refused[1]["address"] in ("127.0.0.1", "::1")


@pytest.mark.parametrize(
    "url",
    [
        "https://[64:ff9b::5db8:d70e]/hooks",  # NAT64 -> 93.184.215.14
        "https://[2002:5db8:d70e::1]/hooks",  # 6to4 -> 93.184.215.14
        "https://93.184.215.14/a%20b",
    ],
)
def test_urls_that_reach_a_public_address_are_accepted(customer, settings, url):
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    client = api_client_for(customer)
    response = client.post("/api/v1/webhooks/", {**BODY, "url": url}, format="json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://B\u00dcCHER.example/hooks", "xn--bcher-kva.example"),
        # IDNA 2008, as browsers read it: Python's IDNA 2003 codec makes this fass.example.
        ("https://fa\u00df.example/hooks", "xn--fa-hia.example"),
        ("https://b\u00fccher\u3002example/hooks", "xn--bcher-kva.example"),  # an ideographic dot
        ("https://xn--bcher-kva.example/hooks", "xn--bcher-kva.example"),
        ("https://under_score.example/hooks", "under_score.example"),  # ASCII: as it was
    ],
)
def test_a_host_is_resolved_and_presented_in_its_ascii_form(settings, monkeypatch, url, host):
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    looked_up = []

    def getaddrinfo(name, port, *args, **kwargs):
        looked_up.append(name)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert check_new_url(url).host == host
    assert looked_up == [host]


def test_every_address_of_a_host_is_checked_and_kept_in_the_resolvers_order(settings, monkeypatch):
    """A delivery may connect to any address the name resolves to, so each must pass and each
    is kept, in the resolver's order and once (for a delivery to try in turn); one internal
    address among public ones refuses the URL, named for staff."""
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    answers = {
        "multi.shop.example": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "93.184.215.14"] * 2,
        "mixed.shop.example": ["93.184.215.14", "10.20.30.40"],
    }

    def getaddrinfo(name, port, *args, **kwargs):
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[name]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    target = check_url("https://multi.shop.example/hooks")
    assert target.addresses == ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "93.184.215.14")
    with pytest.raises(UrlRefused) as refused:
        check_url("https://mixed.shop.example/hooks")
    assert (refused.value.code, refused.value.address) == ("private_address", "10.20.30.40")


def test_with_allow_private_another_scheme_is_told_http_is_accepted(customer, settings):
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    client = api_client_for(customer)
    body = assert_error(
        client.post("/api/v1/webhooks/", {**BODY, "url": "ftp://127.0.0.1/x"}, format="json"), 400
    )
    assert "or http, while WEBHOOKS_ALLOW_PRIVATE is on" in body["detail"], body


def test_with_allow_private_plain_http_on_loopback_is_accepted(customer, settings):
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    client = api_client_for(customer)
    response = client.post(
        "/api/v1/webhooks/", {**BODY, "url": "http://127.0.0.1:9/hooks"}, format="json"
    )
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("events", [[], ["order.shipped"], "order.confirmed", None, [1]], ids=repr)
def test_events_must_be_a_non_empty_list_of_known_types(customer, events):
    client = api_client_for(customer)
    body = assert_error(
        client.post("/api/v1/webhooks/", {**BODY, "events": events}, format="json"), 400
    )
    assert "events" in "".join(body["fields"]), body


def test_a_client_has_at_most_20_endpoints_and_may_register_one_url_twice(customer):
    """As docs/webhooks.md says: the 21st registration is refused; the same URL twice is two
    endpoints, each with its own secret."""
    client = api_client_for(customer)
    secrets = set()
    for _ in range(20):
        created = client.post("/api/v1/webhooks/", BODY, format="json")
        assert created.status_code == 201, created.content
        secrets.add(created.json()["secret"])
    assert len(secrets) == 20
    body = assert_error(client.post("/api/v1/webhooks/", BODY, format="json"), 400)
    assert body["code"] == "too_many_endpoints", body
    assert Endpoint.objects.filter(owner=customer).count() == 20


def test_a_rotated_secret_signs_beside_the_new_one_for_the_grace_period(customer, settings):
    client = api_client_for(customer)
    created = client.post("/api/v1/webhooks/", BODY, format="json").json()
    rotated = client.post(f"/api/v1/webhooks/{created['id']}/rotate-secret/")
    assert rotated.status_code == 200, rotated.content
    new = rotated.json()["secret"]
    assert new != created["secret"] and new.startswith("whsec_")

    endpoint = Endpoint.objects.get(pk=created["id"])
    now = timezone.now()
    header = signing.sign(endpoint.signing_secrets(now), b'{"x":1}')
    assert signing.verify(new, header, b'{"x":1}')
    assert signing.verify(created["secret"], header, b'{"x":1}')  # still, during the grace
    later = datetime.fromisoformat(endpoint.previous_secrets[0]["expires_at"])
    header = signing.sign(endpoint.signing_secrets(later), b'{"x":1}')
    assert signing.verify(new, header, b'{"x":1}')
    assert not signing.verify(created["secret"], header, b'{"x":1}')  # not after it


def test_a_second_rotation_within_the_grace_keeps_the_first_secrets_grace(customer, settings):
    """Rotated twice in a row (the first new secret leaked on its way, say): the receiver may
    still verify with the original secret, which keeps signing until its own grace ends."""
    client = api_client_for(customer)
    created = client.post("/api/v1/webhooks/", BODY, format="json").json()
    path = f"/api/v1/webhooks/{created['id']}/rotate-secret/"
    secrets = [created["secret"]]
    for _ in range(4):
        secrets.append(client.post(path).json()["secret"])
    endpoint = Endpoint.objects.get(pk=created["id"])
    header = signing.sign(endpoint.signing_secrets(timezone.now()), b"{}")
    signing_now = [s for s in secrets if signing.verify(s, header, b"{}")]
    # The newest and the three it replaced last; the fourth rotation ended the original's.
    assert signing_now == secrets[1:]
    assert header.count("v1=") == 4
    first_expiry = datetime.fromisoformat(endpoint.previous_secrets[-1]["expires_at"])
    header = signing.sign(endpoint.signing_secrets(first_expiry), b"{}")
    assert not signing.verify(secrets[1], header, b"{}")  # its grace is over then
    assert signing.verify(secrets[2], header, b"{}")  # the later ones' is not


def test_verify_refuses_a_tampered_body_and_an_old_timestamp():
    header = signing.sign(["whsec_s"], b"body")
    assert signing.verify("whsec_s", header, b"body")
    assert not signing.verify("whsec_s", header, b"body!")
    old = signing.sign(["whsec_s"], b"body", timestamp=int(time.time()) - 3600)
    assert not signing.verify("whsec_s", old, b"body")


def test_each_delivery_attempt_leaves_the_character_rule_to_registration(settings):
    """Each delivery attempt asks check_url, which leaves the characters to registration:
    urllib3 percent-encodes the path it sends, so such an endpoint was, and is, delivered."""
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    url = "https://93.184.215.14/a b"
    assert check_url(url).path == "/a b"
    with pytest.raises(UrlRefused) as refused:
        check_new_url(url)
    assert refused.value.code == "invalid_url"


def test_a_registration_retried_with_its_idempotency_key_gets_the_same_endpoint(
    customer, other_customer
):
    """A client whose answer was lost retries with the same key: the endpoint it registered,
    with its secret, not a second endpoint whose secret it never saw. Another body under the
    key is a 422; another client's key is its own."""
    client = api_client_for(customer)
    first = client.post("/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="hook-1")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first
    again = client.post("/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="hook-1")
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and again["Location"] == first["Location"]
    assert Endpoint.objects.filter(owner=customer).count() == 1

    other_body = {**BODY, "events": ["order.cancelled"]}
    reused = client.post(
        "/api/v1/webhooks/", other_body, format="json", HTTP_IDEMPOTENCY_KEY="hook-1"
    )
    assert_error(reused, 422, "idempotency_key_reused")
    bad = client.post("/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="a\tb")
    assert_error(bad, 400, "invalid_idempotency_key")
    assert Endpoint.objects.filter(owner=customer).count() == 1

    theirs = api_client_for(other_customer).post(
        "/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="hook-1"
    )
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]


def test_a_replayed_registration_is_not_a_new_endpoint_at_the_limit(customer):
    client = api_client_for(customer)
    for n in range(20):
        created = client.post(
            "/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY=f"hook-{n}"
        )
        assert created.status_code == 201, created.content
    again = client.post("/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="hook-7")
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    fresh = client.post("/api/v1/webhooks/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="hook-20")
    assert_error(fresh, 400, "too_many_endpoints")
    assert Endpoint.objects.filter(owner=customer).count() == 20
