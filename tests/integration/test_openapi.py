"""GET /openapi.json: an OpenAPI 3.1 description kept in step with the routes."""

from __future__ import annotations

import schemathesis
from starlette.routing import Route
from starlette.testclient import TestClient

from service.web import openapi
from service.web.app import routes
from service.web.auth import Access, access_of
from service.web.errors import EDGE_CODES, STATUS

SECURITY: dict[Access, list[dict[str, list[str]]]] = {
    Access.API: [{"apiToken": []}],
    Access.ADMIN: [{"adminToken": []}],
    Access.OPEN: [],
}


def routed() -> set[tuple[str, str]]:
    found = set()
    for route in routes():
        assert isinstance(route, Route)
        found |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return found


def described() -> set[tuple[str, str]]:
    return {(path, method) for path, ops in openapi.PATHS.items() for method in ops}


def test_every_route_is_described_and_every_description_routed() -> None:
    """The set of (path, method) in the description is exactly the set the app routes."""
    assert routed() == described()


def test_each_operation_declares_the_token_its_route_group_demands() -> None:
    """An operation's security matches its route's group: API, admin or none."""
    for route in routes():
        assert isinstance(route, Route)
        access = access_of(route)
        assert access is not None
        for method in route.methods or ():
            if method != "HEAD":
                op = openapi.PATHS[route.path][method.lower()]
                assert SECURITY[access] == op["security"], (route.path, method)


def test_description_is_served_without_a_token_and_is_valid_openapi_3_1(
    client: TestClient,
) -> None:
    """/openapi.json answers 200 without a token, and the document loads as OpenAPI 3.1."""
    r = client.get("/openapi.json")
    assert 200 == r.status_code
    body = r.json()
    assert "3.1.0" == body["openapi"]
    assert openapi.document() == body
    schema = schemathesis.openapi.from_dict(body)
    assert len(described()) == len(list(schema.get_all_operations()))


def test_every_error_code_is_described() -> None:
    """Each code of the error table is named by the Error schema and answered somewhere,
    except the 500 that no operation should ever answer and the codes answered before any
    route (unknown route, wrong method, the HTTP edge's own limits)."""
    described_codes = set(openapi.SCHEMAS["Error"]["properties"]["code"]["enum"])
    assert set(STATUS) == described_codes
    answered = set()
    for ops in openapi.PATHS.values():
        for op in ops.values():
            for response in op["responses"].values():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                for part in schema.get("allOf", []):
                    answered |= set(part.get("properties", {}).get("code", {}).get("enum", []))
    unrouted = {"internal_error", "not_found", "method_not_allowed", *EDGE_CODES}
    assert set(STATUS) - unrouted == answered
