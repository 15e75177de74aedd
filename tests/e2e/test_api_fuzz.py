"""schemathesis against a real `serve`: hostile input never gets a 5xx, answers match the
description.

Bounded and derandomized so CI stays fast and the same inputs run every time (a
new failure is a new bug, not a new seed); FUZZ_EXAMPLES raises the bound for a
longer local hunt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.web import openapi
from tests.conftest import (
    ADMIN_TOKEN,
    API_TOKEN,
    TEMPLATE,
    create_database,
    drop_database,
    service_env,
)
from tests.helpers.api import register, set_balance
from tests.helpers.procs import cluster

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SCHEMA = schemathesis.openapi.from_dict(openapi.document())
SCHEMA.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES,
    deterministic=True,
    # NUL bytes too: what PostgreSQL refuses must be a 400 at the edge
    allow_x00=True,
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The parks the description's examples name: some fuzzed calls reach real rows.
EXAMPLE_PARK = "park-alpha"


@pytest.fixture(scope="module")
def api(
    pg_server_url: str,
    template_url: str,
    emulator_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """One served API for the whole module, on its own database, with an example park."""
    url = create_database(pg_server_url, template=TEMPLATE)
    try:
        env = service_env(url, emulator_url, API_DRAIN_SECONDS="0", SHUTDOWN_GRACE_SECONDS="2")
        with cluster(env, tmp_path_factory.mktemp("fuzz")) as c:
            base = c.api()
            register(base, EXAMPLE_PARK)
            set_balance(emulator_url, EXAMPLE_PARK, "500.00")
            yield base
    finally:
        drop_database(pg_server_url, url)


def token_for(path: str) -> str:
    """The token of the route's group, so most calls get past auth and into the handler."""
    return ADMIN_TOKEN if path.startswith(("/v1/parks", "/v1/audit", "/v1/admin")) else API_TOKEN


@SCHEMA.parametrize()
@settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_gets_a_server_error_or_an_undescribed_answer(
    case: schemathesis.Case, api: str
) -> None:
    """Every generated request, valid or hostile, is answered below 500 and as described."""
    headers = {"Authorization": f"Bearer {token_for(case.path)}"}
    case.call_and_validate(base_url=api, headers=headers, checks=CHECKS, timeout=10)


def test_api_is_still_ready_after_the_fuzzing(api: str) -> None:
    """After every hostile request the served API is still ready (no connection wedged)."""
    r = httpx.get(f"{api}/ready", timeout=5)
    assert 200 == r.status_code, r.text
