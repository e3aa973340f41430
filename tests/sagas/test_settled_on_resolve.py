"""``SagaDefinition.settled_on_resolve``: the steps a type's ``on_resolve`` undoes itself are
not named among the effects a resolve keeps (the order saga's reservation: see
tests/orders/test_manual_undo.py), and a definition naming steps it does not have, or with no
``on_resolve`` to settle them, is refused when it is declared."""

from __future__ import annotations

import pytest

from sagas.definition import SagaDefinition
from tests.sagas.sagatypes import scripted


def _settle(saga) -> None:
    return None


def test_settled_steps_must_be_steps_of_the_type_with_an_on_resolve():
    steps = scripted(["s1", "s2"])
    with pytest.raises(ValueError, match="settled_on_resolve"):
        SagaDefinition("settles", steps=steps, on_resolve=_settle, settled_on_resolve=("s9",))
    with pytest.raises(ValueError, match="needs an on_resolve"):
        SagaDefinition("settles", steps=steps, settled_on_resolve=("s1",))
    SagaDefinition("settles", steps=steps, on_resolve=_settle, settled_on_resolve=("s1",))
