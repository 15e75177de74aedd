"""Error codes as one enum (service/core/codes.py): the status map, the codes the source
answers and OpenAPI's per-operation lists are all Code, and each has all of it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from service.core.codes import Code
from service.web import openapi
from service.web.errors import EDGE_CODES, STATUS
from tests.helpers.emulator import REPO_ROOT

SERVICE = REPO_ROOT / "service"
# Calls whose first argument is an API error code.
RAISERS = {"ApiError", "Refused", "RuleRefused", "error_bytes"}
# The console renders HTML pages with codes of its own (csrf, too_many_sign_ins): not the API.
# OpenAPI describes the codes; it answers none.
NOT_THE_API = (
    SERVICE / "web" / "console",
    SERVICE / "core" / "codes.py",
    SERVICE / "web" / "openapi.py",
)


def codes_in_source(path: Path) -> tuple[set[str], set[str]]:
    """The codes a module names: as Code members, and as string literals given to a raiser."""
    members: set[str] = set()
    literals: set[str] = set()
    tree = ast.parse(path.read_text())
    # Keys of a map and members of a set list codes (the status map, EDGE_CODES): they
    # answer nothing by themselves.
    listing = {
        id(k) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None
    } | {id(e) for n in ast.walk(tree) if isinstance(n, ast.Set) for e in n.elts}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "Code"
            and id(node) not in listing
        ):
            members.add(Code[node.attr].value)
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if name in RAISERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                literals.add(first.value)
    return members, literals


def answered_by_source() -> tuple[set[str], set[str]]:
    members: set[str] = set()
    literals: set[str] = set()
    for path in sorted(SERVICE.rglob("*.py")):
        if any(path.is_relative_to(skip) for skip in NOT_THE_API):
            continue
        m, lit = codes_in_source(path)
        members |= m
        literals |= lit
    return members, literals


def code_enums(node: Any) -> set[str]:
    """Every code an error response's schema names (its `code` property's enum), at any depth."""
    if isinstance(node, list):
        return set().union(*(code_enums(n) for n in node))
    if not isinstance(node, dict):
        return set()
    found = set(node.get("properties", {}).get("code", {}).get("enum", []))
    return found.union(*(code_enums(v) for v in node.values()))


def described_by_openapi() -> set[str]:
    """The codes OpenAPI names: per operation, plus those it describes for every request
    (in its info) and the 500 that the Error schema alone names."""
    document = openapi.document()
    info = document["info"]["description"]
    everywhere = {c.value for c in Code if c.value in info}
    return code_enums(document["paths"]) | everywhere | {Code.INTERNAL_ERROR.value}


def test_every_code_has_one_status() -> None:
    """The status map's keys are exactly Code's members, each a member, not a bare string."""
    assert set(Code) == set(STATUS)
    assert [] == [k for k in STATUS if not isinstance(k, Code)]
    assert EDGE_CODES <= set(Code)


def test_the_source_answers_only_codes_of_the_enum() -> None:
    """Every string code given to ApiError, Refused or the edge's error_bytes is a Code."""
    _, literals = answered_by_source()
    assert set() == literals - {c.value for c in Code}


def test_every_code_the_api_answers_is_in_openapi_and_back() -> None:
    """The codes named anywhere in the API's source are the codes OpenAPI describes."""
    members, literals = answered_by_source()
    assert described_by_openapi() == members | literals


def test_openapis_error_enum_is_codes() -> None:
    """The Error schema's code enum lists Code, sorted."""
    assert sorted(c.value for c in Code) == openapi.SCHEMAS["Error"]["properties"]["code"]["enum"]
