"""What the webhooks app tells the apps whose changes it carries.

``subscribed`` is sent, inside the transaction that makes it so, when a client gains an
endpoint events are written for (one registered, or one switched back on by staff: events are
written for a switched-off endpoint, not for one being deleted), with ``owner_id``. An app that
only tells the outbox about subjects whose client had an endpoint (the orders, to keep the
sagas of clients without one free of any query) marks the client's subjects still in flight,
so every change from then on is delivered.
"""

from __future__ import annotations

from django.dispatch import Signal

subscribed = Signal()
