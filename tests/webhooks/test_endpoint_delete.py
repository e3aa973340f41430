"""Deleting an endpoint while an event for it is being written: the event's transaction read
the endpoint as active, inserted its delivery and commits while the delete runs, after the
delete took the endpoint's deliveries and before its row goes. The delete takes that late
delivery with it instead of failing its foreign key check (a 500 that left the endpoint in
place, still receiving)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from webhooks.models import Delivery, Endpoint, Event

from .conftest import api_client_for, register

pytestmark = pytest.mark.django_db(transaction=True)


class LateEvent:
    """An event's transaction on a connection of its own: its delivery inserted at once,
    committed when :meth:`commit` is called."""

    def __init__(self, endpoint_id: str) -> None:
        self.inserted, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint_id,), daemon=True)
        self.thread.start()
        assert self.inserted.wait(30)

    def _run(self, endpoint_id: str) -> None:
        try:
            with transaction.atomic():
                endpoint = Endpoint.objects.get(pk=endpoint_id)
                subject, now = uuid.uuid4(), timezone.now()
                event = Event.objects.create(
                    owner_id=endpoint.owner_id, type="order.updated", subject=subject,
                    sequence=1, body="{}", created_at=now,
                )  # fmt: skip
                Delivery.objects.create(
                    event=event, endpoint=endpoint, subject=subject, sequence=1,
                    next_attempt_at=now, retry_until=now + timedelta(days=1),
                )  # fmt: skip
                self.inserted.set()
                assert self.go.wait(30)
        finally:
            connection.close()
            self.done.set()

    def commit(self) -> None:
        self.go.set()
        assert self.done.wait(30)

    def committed_just_before_the_row_goes(self) -> Any:
        """While in this block, the delete's statement on the endpoint's row runs only once
        this event has committed."""
        endpoint_row = f'DELETE FROM "{Endpoint._meta.db_table}"'

        def wrapper(execute, sql, params, many, context):
            if sql.startswith(endpoint_row) and not self.done.is_set():
                self.commit()
            return execute(sql, params, many, context)

        return connection.execute_wrapper(wrapper)


def test_an_endpoint_deleted_while_an_event_for_it_commits_is_deleted_with_its_deliveries(
    customer,
):
    client = api_client_for(customer)
    endpoint_id = register(client, "http://127.0.0.1:9/hooks")["id"]
    late = LateEvent(endpoint_id)
    with late.committed_just_before_the_row_goes():
        response = client.delete(f"/api/v1/webhooks/{endpoint_id}/")
    assert late.done.is_set()  # its delivery committed during the delete
    assert response.status_code == 204, response.content
    assert not Endpoint.objects.filter(pk=endpoint_id).exists()
    assert not Delivery.objects.filter(endpoint_id=endpoint_id).exists()


def test_the_ops_console_deletes_an_endpoint_while_an_event_for_it_commits(customer, admin_client):
    """The same race through the console's delete, inside the admin's own transaction."""
    endpoint_id = register(api_client_for(customer), "http://127.0.0.1:9/hooks")["id"]
    late = LateEvent(endpoint_id)
    page = f"/admin/webhooks/endpoint/{endpoint_id}/delete/"
    with late.committed_just_before_the_row_goes():
        response = admin_client.post(page, {"post": "yes"})
    assert late.done.is_set()
    assert response.status_code == 302, response.content[:500]
    assert not Endpoint.objects.filter(pk=endpoint_id).exists()
    assert not Delivery.objects.filter(endpoint_id=endpoint_id).exists()


def test_the_console_says_so_when_events_keep_arriving_and_leaves_the_endpoint_disabled(
    customer, admin_client, monkeypatch
):
    """Five tries all beaten by late events (made to happen here): a message, no 500, and the
    endpoint disabled (committed before the admin's transaction), to be deleted again."""
    from webhooks import admin as webhooks_admin
    from webhooks.services import EndpointBusy

    def busy(*, endpoint):
        raise EndpointBusy(endpoint.pk)

    monkeypatch.setattr(webhooks_admin, "endpoint_delete", busy)
    endpoint_id = register(api_client_for(customer), "http://127.0.0.1:9/hooks")["id"]
    page = f"/admin/webhooks/endpoint/{endpoint_id}/delete/"
    response = admin_client.post(page, {"post": "yes"}, follow=True)
    assert response.status_code == 200
    assert "it is disabled, not deleted" in response.content.decode()
    assert Endpoint.objects.get(pk=endpoint_id).is_active is False
    malformed = admin_client.post("/admin/webhooks/endpoint/not-a-uuid/delete/", {"post": "yes"})
    assert malformed.status_code in (302, 404)  # the admin's own answer for an unknown id


def _waits_on_a_lock(sql_start: str) -> bool:
    """Whether another session runs a statement starting so and waits for a row lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            [sql_start + "%"],
        )
        return cursor.fetchone()[0] > 0


def test_an_event_that_read_the_endpoint_before_its_delete_still_commits(customer, wait_for):
    """The other side of the race: an event's transaction (a saga's record) read the endpoint
    as active and wrote its delivery; the endpoint is deleted before that transaction commits.
    The delete waits for it, then takes its delivery; the event's transaction commits, where it
    failed its foreign key check at commit before (the record rolled back and its step ran
    again after its lease)."""
    from webhooks.services import endpoint_delete, event_emit

    endpoint_id = register(api_client_for(customer), "http://127.0.0.1:9/hooks")["id"]
    emitted, go, outcome = threading.Event(), threading.Event(), []

    def the_record() -> None:
        try:
            with transaction.atomic():
                event_emit(
                    owner_id=customer.pk, subject=uuid.uuid4(), type="order.updated", data={}
                )
                emitted.set()
                assert go.wait(30)
            outcome.append("committed")
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test asserts
            outcome.append(repr(exc))
        finally:
            emitted.set()
            connection.close()

    record = threading.Thread(target=the_record, daemon=True)
    record.start()
    assert emitted.wait(30)
    assert Event.objects.count() == 0  # not committed yet

    def the_delete() -> None:
        try:
            endpoint_delete(endpoint=Endpoint.objects.get(pk=endpoint_id))
        finally:
            connection.close()

    delete = threading.Thread(target=the_delete, daemon=True)
    delete.start()
    endpoint_row = f'DELETE FROM "{Endpoint._meta.db_table}"'
    # The delete reaches the endpoint's row and waits for the event's transaction (before the
    # fix it went through and committed, which is what this also stops waiting on).
    wait_for(lambda: _waits_on_a_lock(endpoint_row) or not delete.is_alive(), timeout=30)
    go.set()
    record.join(30)
    delete.join(30)
    assert outcome == ["committed"]
    assert not record.is_alive() and not delete.is_alive()
    assert Event.objects.count() == 1
    assert not Endpoint.objects.filter(pk=endpoint_id).exists()
    assert not Delivery.objects.filter(endpoint_id=endpoint_id).exists()
