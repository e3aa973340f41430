"""The ops console and definition versions: the version in the list (with a filter) and on
the saga page, unfinished sagas per type and version on the dashboard, and sagas no worker on
this code can run shown as waiting for their definition."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.urls import reverse

from sagas.definition import get_definition, register, unregister
from sagas.models import Saga, SagaState
from sagas.services import saga_start

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"
DASHBOARD = "/admin/sagas/saga/dashboard/"


@contextmanager
def without_v1() -> Iterator[None]:
    """This process plays code that no longer registers ``ver`` v1."""
    v1 = get_definition("ver", 1)
    unregister("ver", 1)
    try:
        yield
    finally:
        register(v1)


def start(version: int) -> Saga:
    # No worker and no commit (the test's transaction): the saga stays at its first step.
    return saga_start(saga_type="ver", data={}, version=version)


def test_the_list_shows_and_filters_the_version(ops_client):
    old, new = start(1), start(2)
    html = ops_client.get(LIST, {"saga_type": "ver"}).content.decode()
    assert "ver v1" in html and "ver v2" in html
    assert "?definition_version=2" in html or "definition_version=2" in html
    filtered = ops_client.get(LIST, {"definition_version": "2"}).content.decode()
    assert str(new.pk) in filtered and str(old.pk) not in filtered
    assert ops_client.get(LIST, {"definition_version": "x"}).status_code == 200


def test_the_saga_page_shows_its_version_and_when_it_waits_for_its_definition(ops_client):
    old = start(1)
    page = reverse("admin:sagas_saga_change", args=[old.pk])
    html = ops_client.get(page).content.decode()
    assert f"version 1 (shape {get_definition('ver', 1).fingerprint})" in html
    assert 'id="definition-missing"' not in html
    with without_v1():
        html = ops_client.get(page).content.decode()
        listed = ops_client.get(LIST, {"saga_type": "ver"}).content.decode()
    assert 'id="definition-missing"' in html and "waiting for its definition" in html
    assert "this code does not register ver v1 (registered: v2)" in html
    assert "waiting for its definition" in listed


def test_the_dashboard_counts_unfinished_sagas_per_type_and_version(ops_client):
    start(1), start(1), start(2)
    done = start(1)
    Saga.objects.filter(pk=done.pk).update(state=SagaState.SUCCEEDED)
    html = ops_client.get(DASHBOARD).content.decode()
    v1 = html[html.index('id="version-ver-1"') :]
    v1 = v1[: v1.index("</tr>")]
    assert "<td>2</td>" in v1 and "older: draining" in v1
    v2 = html[html.index('id="version-ver-2"') :]
    v2 = v2[: v2.index("</tr>")]
    assert "<td>1</td>" in v2 and "newest" in v2
    # Its link lists the sagas it counts: the finished one is not among them.
    link = v1[v1.index('href="') + 6 :]
    listed = ops_client.get(link[: link.index('"')].replace("&amp;", "&")).content.decode()
    assert str(done.pk) not in listed and listed.count('class="action-select"') == 2
    with without_v1():
        html = ops_client.get(DASHBOARD).content.decode()
    v1 = html[html.index('id="version-ver-1"') :]
    assert "waiting for its definition" in v1[: v1.index("</tr>")]
