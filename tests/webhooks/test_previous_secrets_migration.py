"""Migration ``webhooks.0003``: an endpoint rotated before it keeps its previous secret
signing until the end of that secret's grace period."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tests.migrating import migrated_to
from webhooks import signing
from webhooks.models import Endpoint

from .conftest import api_client_for

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("webhooks", "0002_ops_group")


def test_a_secret_rotated_under_0002_keeps_signing_until_its_grace_ends(customer):
    client = api_client_for(customer)
    body = {"url": "https://93.184.215.14/hooks", "events": ["order.confirmed"]}
    rotated = client.post("/api/v1/webhooks/", body, format="json").json()["id"]
    never = client.post("/api/v1/webhooks/", body, format="json").json()["id"]
    expires = timezone.now() + timedelta(hours=1)
    with migrated_to([BEFORE]), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE webhooks_endpoint SET previous_secret = %s, "
            "previous_secret_expires_at = %s WHERE id = %s",
            ["whsec_before", expires, rotated],
        )
    endpoint = Endpoint.objects.get(pk=rotated)
    assert endpoint.previous_secrets == [
        {"secret": "whsec_before", "expires_at": expires.isoformat()}
    ]
    header = signing.sign(endpoint.signing_secrets(timezone.now()), b"{}")
    assert signing.verify("whsec_before", header, b"{}")
    header = signing.sign(endpoint.signing_secrets(expires), b"{}")
    assert not signing.verify("whsec_before", header, b"{}")
    assert Endpoint.objects.get(pk=never).previous_secrets == []
