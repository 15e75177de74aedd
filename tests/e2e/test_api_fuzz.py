"""schemathesis against a real `serve`: hostile input never gets a 5xx, answers match the
description, and the description matches the service both ways (every check schemathesis has,
negative data rejection and positive data acceptance included).

Two phases: every operation alone (positive and negative cases), then the stateful
phase, which follows the description's links from a press to reading and cancelling the
payout it made. Bounded and derandomized so CI stays fast and the same inputs run every
time (a new failure is a new bug, not a new seed); FUZZ_EXAMPLES raises the bound for a
longer local hunt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
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
    # Query parameters the description does not name are ignored, as by most HTTP APIs
    # (a client's cache-buster must not break its calls): not a negative case.
    allow_extra_parameters=False,
)
# `--checks all`, less max_response_time (a timing on shared CPUs is no verdict).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    ignored_auth,
    use_after_free,
    ensure_resource_availability,
]
# A schema-valid request may still be refused by a rule (the idempotency key reused with
# another body, an amount above the limit): 422, as the description says.
SCHEMA.config.checks.positive_data_acceptance.expected_statuses = [
    *SCHEMA.config.checks.positive_data_acceptance.expected_statuses,
    "422",
]
# Cursors are opaque and signed: no generated one was issued by this API, so a case that
# carries one is refused 400 by design (SPEC section 3), schema-valid or not.
OPAQUE = ("cursor", "after")


def checks_for(case: Case[Any]) -> list[Any]:
    """Every check, less positive data acceptance for a case carrying a made-up cursor."""
    if any(name in (case.query or {}) for name in OPAQUE):
        return [check for check in CHECKS if check is not positive_data_acceptance]
    return CHECKS


STATEFUL_SCENARIOS = int(os.environ.get("FUZZ_SCENARIOS", "25"))
# The parks the description's examples name: some fuzzed calls reach real rows.
EXAMPLE_PARK = "park-alpha"


@contextlib.contextmanager
def served_api(
    pg_server_url: str, emulator_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A served API on a database of its own, with an example park."""
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


@pytest.fixture(scope="module")
def api(
    pg_server_url: str,
    template_url: str,
    emulator_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """One served API for the stateless fuzz of the whole module."""
    with served_api(pg_server_url, emulator_url, tmp_path_factory) as base:
        yield base


@pytest.fixture
def fresh_api(
    pg_server_url: str,
    template_url: str,
    emulator_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """An API of its own for the stateful phase: hypothesis replays a scenario's steps and
    calls it flaky when the state other tests left changes what they answer."""
    with served_api(pg_server_url, emulator_url, tmp_path_factory) as base:
        yield base


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
    case: schemathesis.Case[Any], api: str
) -> None:
    """Every generated request, valid or hostile, is answered below 500 and as described."""
    headers = {"Authorization": f"Bearer {token_for(case.path)}"}
    case.call_and_validate(base_url=api, headers=headers, checks=checks_for(case), timeout=10)


def test_api_is_still_ready_after_the_fuzzing(api: str) -> None:
    """After every hostile request the served API is still ready (no connection wedged)."""
    r = httpx.get(f"{api}/ready", timeout=5)
    assert 200 == r.status_code, r.text


def test_stateful_links_reach_cancel_and_answer_as_described(fresh_api: str) -> None:
    """Following the description's links (press, then read and cancel the payout it made),
    every answer is below 500 and as described, and cancel is reached."""
    reached: set[str] = set()

    class Workflow(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {
                "base_url": fresh_api,
                "headers": {"Authorization": f"Bearer {token_for(case.path)}"},
                "timeout": 10,
            }

        def after_call(self, response: Response, case: Case[Any]) -> None:
            reached.add(f"{case.method} {case.path} {response.status_code}")

        def validate_response(
            self, response: Response, case: Case[Any], additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=checks_for(case), transport_kwargs=kwargs)

    Workflow.run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=4,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            # No shrinking: replaying steps against a live API that remembers them (a
            # cooldown, a payout now taken) differs from the first run, which hypothesis
            # reports as flaky and hides the failure it found.
            phases=[Phase.explicit, Phase.generate],
        )
    )
    assert any(r.startswith("POST /v1/payouts/{payout_id}/cancel") for r in reached), reached
