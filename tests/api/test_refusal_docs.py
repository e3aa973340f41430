"""Every refusal code an ops route can answer is named for that route in docs/api.md and in
the route's 409 in the OpenAPI schema.

The codes come from the source, not from a list kept here: from each route's service function,
every ``SagaOperationRefused("<code>", ...)`` it builds, itself or in the functions of
``sagas.services`` and ``sagas.signals`` it calls, following ``operation`` where it is passed
as a literal (``_refuse_unless_allowed(saga, "retry")``), so a route is held only to the
branches of ``_rule_refusal`` its operation can take. A code added to a service, or a branch
that another operation now reaches, fails here until the docs and the schema say so.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from drf_spectacular.generators import SchemaGenerator

from sagas import services, signals

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"

#: Codes a service can build that the API never answers with a 409, and why.
NOT_API_REFUSALS = {
    # _locked: the route has found the saga first (404); deleted since, it is the API's 404.
    "not_found",
    # _locked with an expected_version: only the ops console sends one (its page's version).
    "changed",
    # A blank reason or note: the route's serializer refuses it first (400 on the field).
    "reason_required",
    "note_required",
}

#: Route as docs/api.md names it -> (service module, function, schema path, method).
ROUTES = {
    "POST /sagas/{id}/retry/": (services, "saga_retry_now", "/api/v1/sagas/{id}/retry/", "post"),
    "POST /sagas/{id}/compensate/": (
        services,
        "saga_compensate",
        "/api/v1/sagas/{id}/compensate/",
        "post",
    ),
    "POST /sagas/{id}/resolve/": (services, "saga_resolve", "/api/v1/sagas/{id}/resolve/", "post"),
    "POST /sagas/{id}/undo-done/": (
        services,
        "saga_undo_done",
        "/api/v1/sagas/{id}/undo-done/",
        "post",
    ),
    "POST /sagas/{id}/signals/{name}/": (
        signals,
        "saga_signal",
        "/api/v1/sagas/{id}/signals/{name}/",
        "post",
    ),
    "GET /sagas/{id}/compensation-plan/": (
        services,
        "saga_compensation_plan",
        "/api/v1/sagas/{id}/compensation-plan/",
        "get",
    ),
}


def _functions() -> dict[str, ast.FunctionDef]:
    found: dict[str, ast.FunctionDef] = {}
    for module in (services, signals):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                found[node.name] = node
    return found


FUNCTIONS = _functions()


def _may_hold(test: ast.expr, operation: str | None) -> bool:
    """False when ``test`` cannot hold with ``operation`` bound (``operation == "x"``,
    ``operation in (...)``, either inside an ``and``); True when it may."""
    if operation is None:
        return True
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return all(_may_hold(value, operation) for value in test.values)
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "operation"
        and len(test.ops) == 1
    ):
        right = test.comparators[0]
        if isinstance(test.ops[0], ast.Eq) and isinstance(right, ast.Constant):
            return right.value == operation
        if isinstance(test.ops[0], ast.In) and isinstance(right, ast.Tuple):
            return operation in [e.value for e in right.elts if isinstance(e, ast.Constant)]
    return True


def _reachable(nodes: list[ast.stmt], operation: str | None) -> Iterator[ast.AST]:
    """The nodes of ``nodes`` that may run with ``operation`` bound."""
    for node in nodes:
        if isinstance(node, ast.If):
            yield from ast.walk(node.test)
            if _may_hold(node.test, operation):
                yield from _reachable(node.body, operation)
            yield from _reachable(node.orelse, operation)
        elif isinstance(node, (ast.For, ast.While, ast.With, ast.Try)):
            for field in ("body", "orelse", "finalbody"):
                yield from _reachable(getattr(node, field, []), operation)
            for handler in getattr(node, "handlers", []):
                yield from _reachable(handler.body, operation)
            for part in ast.iter_child_nodes(node):
                if not isinstance(part, ast.stmt) and not isinstance(part, ast.excepthandler):
                    yield from ast.walk(part)
        else:
            yield from ast.walk(node)


def refusal_codes(name: str, operation: str | None = None, seen: set | None = None) -> set[str]:
    """The codes of the refusals ``name`` builds, itself or through the functions it calls."""
    seen = set() if seen is None else seen
    if (name, operation) in seen:
        return set()
    seen.add((name, operation))
    function = FUNCTIONS[name]
    params = [a.arg for a in function.args.args]
    codes: set[str] = set()
    for node in _reachable(function.body, operation if "operation" in params else None):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        callee = node.func.id
        if callee == "SagaOperationRefused":
            first = node.args[0]
            assert isinstance(first, ast.Constant), ast.unparse(node)  # a code, as a literal
            codes.add(first.value)
        elif callee in FUNCTIONS:
            bound = None
            callee_params = [a.arg for a in FUNCTIONS[callee].args.args]
            if "operation" in callee_params:
                at = callee_params.index("operation")
                given = node.args[at] if at < len(node.args) else None
                if isinstance(given, ast.Constant):
                    bound = given.value
                elif isinstance(given, ast.Name) and given.id == "operation":
                    bound = operation
            codes |= refusal_codes(callee, bound, seen)
    return codes


def _route_docs(route: str) -> str:
    """The bullet of docs/api.md's refusals list that starts with ``route``."""
    text = DOCS.read_text()
    found = re.search(
        rf"^- `{re.escape(route)}`.*?(?=^- |^\s*$)", text, flags=re.MULTILINE | re.DOTALL
    )
    assert found, f"docs/api.md lists no refusals for {route}"
    return found.group(0)


def test_the_analysis_reads_the_operation_of_each_rule():
    """A check on the reading itself: retry reaches the retry rules and no other's."""
    assert refusal_codes("saga_retry_now") == {
        "not_found",
        "changed",
        "in_flight",
        "settled",
        "waiting",
        "definition_missing",
    }


@pytest.mark.parametrize("route", ROUTES)
def test_docs_and_schema_name_every_refusal_of_the_route(route):
    module, function, path, method = ROUTES[route]
    codes = refusal_codes(function) - NOT_API_REFUSALS
    assert codes, route
    documented = set(re.findall(r"`([a-z_]+)`", _route_docs(route)))
    assert codes <= documented, f"docs/api.md does not list {sorted(codes - documented)}"
    schema = SchemaGenerator().get_schema(request=None, public=True)
    conflict = schema["paths"][path][method]["responses"]["409"]["description"]
    named = set(re.findall(r"`([a-z_]+)`", conflict))
    assert codes <= named, f"the schema's 409 does not name {sorted(codes - named)}"
    # And neither names a code the route cannot answer.
    every = {code for fn in FUNCTIONS for code in refusal_codes(fn)}
    assert not (documented & every) - codes, route
    assert not (named & every) - codes, route
