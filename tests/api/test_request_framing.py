"""Request bodies sent in chunks are read like any other; compressed ones are refused.

Django reads a body up to its ``Content-Length`` and took a missing one for an empty body, so a
chunked order was refused as having no items and a chunked cancel whose body was not JSON was
carried out (``config.middleware.FramedBody``). The in-process tests hand the view what
gunicorn hands it (the decoded stream, ``wsgi.input_terminated``, no ``Content-Length``); the
last test sends real chunked requests to gunicorn.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import uuid

import pytest
import requests
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import HttpResponse
from django.test import override_settings

from config.middleware import FramedBody
from orders.models import Order
from sagas.models import SagaEvent
from tests.conftest import database_url_for

from .conftest import api_client_for, assert_error, gunicorn_web, order_body


def _chunked(api, path: str, body: bytes, *, terminated: bool = True, **extra):
    """POST ``body`` as a WSGI server hands a chunked request on: no length, the stream."""
    environ = {
        "CONTENT_LENGTH": "",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": io.BytesIO(body),
        **extra,
    }
    if terminated:
        environ["wsgi.input_terminated"] = True
    return api.generic("POST", path, b"", "application/json", **environ)


def _cancel_requested(order_id: str) -> bool:
    return SagaEvent.objects.filter(saga__order__id=order_id, kind="cancel_requested").exists()


def test_a_chunked_order_is_placed(client_api, catalog):
    response = _chunked(client_api, "/api/v1/orders/", json.dumps(order_body()).encode())
    assert response.status_code == 201, response.content
    assert Order.objects.filter(pk=response.json()["id"]).exists()


def test_a_chunked_cancel_whose_body_is_not_json_is_400_and_cancels_nothing(client_api, place):
    order = place(client_api)
    response = _chunked(client_api, f"/api/v1/orders/{order['id']}/cancel/", b"this is not json")
    assert_error(response, 400, "parse_error")
    assert not _cancel_requested(order["id"])


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_a_chunked_body_over_the_limit_is_413(client_api, place):
    order = place(client_api)
    body = b'{"x": "' + b"a" * 2000 + b'"}'
    response = _chunked(client_api, f"/api/v1/orders/{order['id']}/cancel/", body)
    assert_error(response, 413, "payload_too_large")
    assert not _cancel_requested(order["id"])


def test_a_chunked_body_a_server_cannot_delimit_is_411_and_nothing_is_done(client_api, place):
    """Without ``wsgi.input_terminated`` (Django's runserver) the body's end is unknown."""
    order = place(client_api)
    response = _chunked(
        client_api, f"/api/v1/orders/{order['id']}/cancel/", b"{}", terminated=False
    )
    assert_error(response, 411, "length_required")
    assert not _cancel_requested(order["id"])


def test_a_transfer_coding_besides_chunked_is_415_and_nothing_is_done(client_api, place):
    """gunicorn takes ``gzip, chunked`` off the chunks and hands on the gzip."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/cancel/"
    response = _chunked(
        client_api, path, gzip.compress(b"{}"), HTTP_TRANSFER_ENCODING="gzip, chunked"
    )
    body = assert_error(response, 415, "unsupported_media_type")
    assert "Transfer-Encoding: gzip, chunked" in body["detail"], body
    assert not _cancel_requested(order["id"])


def test_under_asgi_a_chunked_body_is_left_to_django():
    """Django's ASGI request reads a chunked body itself (there is no WSGI stream to read)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/anything/",
        "query_string": b"",
        "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")],
    }
    request = ASGIRequest(scope, io.BytesIO(b'{"a": 1}'))
    response = FramedBody(lambda r: HttpResponse(r.body))(request)
    assert (response.status_code, response.content) == (200, b'{"a": 1}')


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_a_compressed_body_is_415_and_nothing_is_done(client_api, place, coding):
    order = place(client_api)
    body = gzip.compress(b"{}") if coding == "gzip" else b"{}"
    response = client_api.post(
        f"/api/v1/orders/{order['id']}/cancel/",
        body,
        content_type="application/json",
        headers={"Content-Encoding": coding},
    )
    assert_error(response, 415, "unsupported_media_type")
    assert not _cancel_requested(order["id"])


def test_content_encoding_on_a_request_without_a_body_is_ignored(client_api, place):
    order = place(client_api)
    response = client_api.get(
        f"/api/v1/orders/{order['id']}/", headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.content


@pytest.mark.django_db(transaction=True)
def test_gunicorn_chunked_requests_are_read(tmp_path, wait_for, django_user_model, catalog):
    """As deployed: ``requests`` sends a generator body chunked, gunicorn decodes it."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    env.pop("TEST_DATABASE_NAME", None)
    with gunicorn_web(env, tmp_path) as url:
        buyer = django_user_model.objects.create_user(f"buyer-{uuid.uuid4().hex[:6]}")
        headers = {
            "Authorization": f"Token {api_client_for(buyer).token}",
            "Content-Type": "application/json",
        }
        base = f"{url}/api/v1/orders/"
        body = json.dumps(order_body([("lamp", 2)])).encode()
        placed = requests.post(base, data=iter([body[:10], body[10:]]), headers=headers, timeout=60)
        assert placed.status_code == 201, (placed.status_code, placed.text[:2000])
        assert placed.request.headers.get("Transfer-Encoding") == "chunked"
        order_id = placed.json()["id"]
        cancel = requests.post(
            f"{base}{order_id}/cancel/", data=iter([b"not ", b"json"]), headers=headers, timeout=60
        )
        assert (cancel.status_code, cancel.json()["code"]) == (400, "parse_error"), cancel.text
    assert not _cancel_requested(order_id)
