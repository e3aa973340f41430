"""A Redis channel closed after its transport keeps the worker alive (config.celery_patches).

The broker restart that ended a worker's main process with ``AttributeError("'NoneType' object
has no attribute 'hostname'")``: the consumer's connection was closed (its transport's
``client`` cleared), then a channel of it was closed with a message still unacknowledged, and
kombu tried to build a new Redis client from ``None`` to restore it. This runs that sequence
against the real Redis (its own queue, in the test database number) without a worker, so it
happens every time instead of once in a few chaos runs.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from kombu import Connection

from config import celery_patches

BROKER = "redis://127.0.0.1:6379/15"


@pytest.fixture
def queue_name():
    name = f"test-patch-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(BROKER)
    client.delete(name)


def test_closing_a_channel_of_a_closed_transport_is_a_connection_error_and_keeps_the_message(
    queue_name,
):
    celery_patches.apply()
    conn = Connection(BROKER)
    channel = conn.default_channel
    channel.queue_declare(queue_name)
    channel.basic_publish(channel.prepare_message("ring"), exchange="", routing_key=queue_name)
    message = channel.basic_get(queue_name, no_ack=False)  # delivered, not acknowledged
    assert message is not None
    tag = message.delivery_tag

    transport = conn.transport
    transport.client = None  # what closing the consumer's connection did before the channel
    try:
        with pytest.raises(transport.connection_errors):  # ignored by kombu, not fatal
            channel.close()
        # Not restored now (the broker connection is gone), not lost either: still in Redis's
        # unacked set, which kombu restores to its queue after the visibility timeout.
        assert redis.Redis.from_url(BROKER).hexists("unacked", tag)
    finally:
        r = redis.Redis.from_url(BROKER)
        r.hdel("unacked", tag)
        r.zrem("unacked_index", tag)
