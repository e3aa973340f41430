"""Imports go one way and never in a circle: the import-linter contracts in pyproject.toml.

``make lint`` runs ``lint-imports`` on the same contracts. Here the project's real import graph
is checked, and then the same graph with one import added back that each contract exists to
refuse (the lazy imports that used to close the engine's, the orders' and the webhooks'
cycles among them), so a contract that silently stopped seeing what it guards fails too.
"""

from __future__ import annotations

import copy

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import read_user_options
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.protected import ProtectedContract

from tests.conftest import REPO_ROOT

_CONTRACT_TYPES = {
    "acyclic_siblings": AcyclicSiblingsContract,
    "layers": LayersContract,
    "protected": ProtectedContract,
}


@pytest.fixture(scope="module")
def contracts():
    configuration.configure()  # what lint-imports does first: its readers and graph builder
    options = read_user_options(str(REPO_ROOT / "pyproject.toml"))
    assert options.contracts_options, "pyproject.toml declares no import contracts"
    return options


@pytest.fixture(scope="module")
def graph(contracts):
    session = contracts.session_options
    return grimp.build_graph(
        *session["root_packages"],
        # The reader hands every scalar over as text, as it does to lint-imports.
        exclude_type_checking_imports=session.get("exclude_type_checking_imports") == "True",
        cache_dir=None,
    )


def broken_contracts(options, graph) -> dict[str, str]:
    """``{contract id: its name}`` of every contract the graph breaks."""
    broken = {}
    for raw in options.contracts_options:
        contract = _CONTRACT_TYPES[raw["type"]](
            name=raw["name"], session_options=options.session_options, contract_options=raw
        )
        if not contract.check(copy.deepcopy(graph), verbose=False).kept:
            broken[raw["id"]] = raw["name"]
    return broken


def test_the_project_keeps_every_import_contract(contracts, graph):
    assert broken_contracts(contracts, graph) == {}


@pytest.mark.parametrize(
    ("importer", "imported", "breaks"),
    [
        # The doorbell importing the task that runs the runner: the engine's old circle.
        ("sagas.doorbell", "sagas.tasks", {"no-cycles", "engine-rooms"}),
        # The ops services importing the sweeper, which cancels through them.
        ("sagas.services", "sagas.sweeper", {"no-cycles", "engine-rooms"}),
        # An ops operation that runs steps itself.
        ("sagas.services", "sagas.runner", {"engine-rooms"}),
        # The order events rendering through the API module (orders.api -> services -> events).
        ("orders.events", "orders.api", {"no-cycles"}),
        # Delivery importing its own Celery task (webhooks.tasks -> delivery).
        ("webhooks.delivery", "webhooks.tasks", {"no-cycles"}),
        # The API helpers every app imports reaching into the engine.
        ("config.api", "sagas.metrics", {"apps"}),
        # A participant reaching into orders; production code importing the tooling.
        ("payments.services", "orders.models", {"apps"}),
        ("sagas.runner", "lab.bench_saga", {"apps"}),
        # Another app going past sagas.public into the engine's rooms.
        ("orders.services", "sagas.store", {"engine-surface"}),
    ],
)
def test_an_import_that_closes_a_circle_or_goes_upwards_breaks_a_contract(
    contracts, graph, importer, imported, breaks
):
    assert imported not in graph.find_modules_directly_imported_by(importer)
    graph = copy.deepcopy(graph)
    graph.add_import(importer=importer, imported=imported, line_number=1, line_contents="lazy")
    assert set(broken_contracts(contracts, graph)) >= breaks
