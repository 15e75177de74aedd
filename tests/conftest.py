"""Shared fixtures: a real PostgreSQL started by the suite, one migrated
template database, and a fresh clone of it for every test that asks.

`TEST_DATABASE_URL` points the suite at an existing server instead (its
user must be allowed to CREATE DATABASE).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from service.core import db
from service.core import settings as settings_module
from service.core.settings import Settings
from service.ops import migrate, roles
from tests.helpers.emulator import run_emulator

if TYPE_CHECKING:
    from starlette.testclient import TestClient

    from service.payouts.execution import Deps
    from tests.helpers.procs import Cluster
    from tests.helpers.proxy import BillingProxy

TEMPLATE = f"fp_template_{os.getpid()}"
CLONE_TIMEOUT_S = 120.0
_counter = itertools.count()

API_TOKEN = "test-api-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"


# End-to-end files whose cases time nothing tighter than a generous wait (a fuzz, a browser,
# `dev`, the events feed's order, racing presses, alerts on real scrapes, a rolling deploy's
# exactly-once): they may run beside another end-to-end test. The others (budgets per
# second, drills, frozen workers and skewed clocks, faults, drains, slow clients, sign-in
# floods timed per answer) keep one process to themselves, one at a time.
E2E_SHARING = frozenset(
    f"tests/e2e/test_{name}.py"
    for name in (
        "api_fuzz",
        "console_browser",
        "dev",
        "events",
        "instant_concurrency",
        "ops_alerts",
        "rolling_deploy",
    )
)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `-n 2` (make test) the timed end-to-end tests run on the same pytest process, one
    at a time: they time real processes, and two such clusters at once on two cores would
    turn their deadlines into a contest. The other process takes the rest (E2E_SHARING among
    them), test by test, and the first to finish helps the other. (xdist's own --dist
    loadgroup would do this from a marker, but it writes the group into a private attribute
    pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]  # no py.typed

    class TimedEndToEndOnOneProcess(LoadScopeScheduling):  # type: ignore[misc]  # untyped base
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path.startswith("tests/e2e/") and path not in E2E_SHARING:
                return "e2e"
            return nodeid

    return TimedEndToEndOnOneProcess(config, log)


def with_dbname(url: str, name: str) -> str:
    """The same server, another database, as a postgresql:// URL (what DATABASE_URL takes)."""
    params = conninfo_to_dict(url)
    user = params.get("user") or "postgres"
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or "5432"
    password = f":{params['password']}" if params.get("password") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


def with_user(url: str, user: str) -> str:
    """The same database, logged in as another role (the suite's server trusts local logins)."""
    params = conninfo_to_dict(url)
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or "5432"
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A PostgreSQL server for the whole session: TEST_DATABASE_URL, or our own."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    from fleet_payouts_devkit.postgres import temporary_server

    with temporary_server("fp-test-pg-", fast_unsafe=True) as url:
        yield url


@pytest.fixture(scope="session")
def template_url(pg_server_url: str) -> Iterator[str]:
    """A database migrated once; tests clone it (CREATE DATABASE ... TEMPLATE)."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = with_dbname(pg_server_url, TEMPLATE)
    asyncio.run(migrate.migrate(url))
    yield url
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


def create_database(server_url: str, *, template: str | None) -> str:
    # Unique without a shared counter: test modules that import this file as
    # `tests.conftest` get a second copy of it (pytest loaded it as `conftest`), whose
    # counter would start again at 0 beside the clone thread's.
    name = f"fp_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        suffix = f' TEMPLATE "{template}"' if template else ""
        if template and conn.info.server_version >= 150000:
            # Copying the template's files takes half the CPU of PostgreSQL 15's default
            # (WAL-logging every page): 0.12 s against 0.25 s a clone here, ~1,300 clones.
            suffix += " STRATEGY file_copy"
        conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    return with_dbname(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Clones:
    """Clones of the template for the tests, made one ahead and dropped after use on a thread
    of their own: a test waits for neither while that thread has kept up (~1 s a clone on a
    busy machine, 0.1-0.2 s a drop)."""

    def __init__(self, server_url: str, template: str) -> None:
        self.server_url = server_url
        self.template = template
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._made: queue.SimpleQueue[str | Exception] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="test-databases", daemon=True)
        self._thread.start()
        self._jobs.put(self._make)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def _make(self) -> None:
        try:
            self._made.put(create_database(self.server_url, template=self.template))
        except Exception as exc:  # the test that takes it fails with it
            self._made.put(exc)

    def take(self) -> str:
        """A fresh clone; the next one starts at once."""
        made = self._made.get(timeout=CLONE_TIMEOUT_S)
        self._jobs.put(self._make)
        if isinstance(made, Exception):
            raise made
        return made

    def drop(self, url: str) -> None:
        self._jobs.put(lambda: drop_database(self.server_url, url))

    def close(self) -> None:
        """Drop what is left (the clone made ahead included), then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        while not self._made.empty():
            made = self._made.get()
            if not isinstance(made, Exception):
                drop_database(self.server_url, made)


@pytest.fixture(scope="session")
def clones(pg_server_url: str, template_url: str) -> Iterator[Clones]:
    c = Clones(pg_server_url, TEMPLATE)
    yield c
    c.close()


@pytest.fixture
def db_url(clones: Clones) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    url = clones.take()
    yield url
    clones.drop(url)


@pytest.fixture
def app_db_url(db_url: str) -> str:
    """This test's database as `serve` and `worker` see it: logged in as fleet_payouts_app."""
    return with_user(db_url, roles.ROLES.app)


@pytest.fixture
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    url = create_database(pg_server_url, template="template0")
    yield url
    drop_database(pg_server_url, url)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[db.Conn]:
    c = await db.connect(db_url, name="test")
    async with c:
        yield c


@pytest.fixture
async def deps(db_url: str, billing_url: str) -> AsyncIterator[Deps]:
    """What the worker hands a job, in-process: a pool on the test's database and a Billing
    client for the session's emulator, paced by this process alone.
    """
    from service.billing.client import BillingClient, Budget
    from service.payouts.execution import Deps

    pool = db.make_pool(db_url, name="test", max_size=4)
    await pool.open(wait=True)
    billing = BillingClient(billing_url, token=None, timeout=1.0, budget=Budget(1000))
    try:
        yield Deps(pool=pool, billing=billing, settings=make_settings(db_url, billing_url))
    finally:
        await billing.aclose()
        await pool.close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[db.Pool]:
    """A pool of up to 8 connections on this test's database, as one worker process holds."""
    p = db.make_pool(db_url, name="test", min_size=1, max_size=8)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def admin(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A second session on the test's database, in a transaction of its own (not autocommit):
    an admin's change that holds its rows until the test commits it."""
    with psycopg.connect(db_url) as c:
        yield c


@pytest.fixture(scope="session")
def emulator_url() -> Iterator[str]:
    with run_emulator() as url:
        yield url


@pytest.fixture
def billing_url(emulator_url: str) -> str:
    """The session's emulator, reset to an empty state for this test."""
    import httpx

    httpx.post(f"{emulator_url}/admin/reset").raise_for_status()
    return emulator_url


# What in-process tests change from the declared defaults: the test tokens, a budget
# the emulator can take, and quick timeouts and retries.
TEST_ENV = {
    "API_TOKENS": API_TOKEN,
    "ADMIN_TOKENS": ADMIN_TOKEN,
    "BILLING_RPS": "100",
    "BILLING_TIMEOUT_SECONDS": "2",
    "RETRY_BACKOFF_CAP_SECONDS": "1",
    "WORKER_POLL_SECONDS": "0.5",
}


@pytest.fixture
def proxy(billing_url: str) -> Iterator[BillingProxy]:
    """A proxy in front of this test's emulator that the test can make hold, drop or answer
    requests oddly."""
    from tests.helpers.proxy import billing_proxy

    with billing_proxy(billing_url) as p:
        yield p


@pytest.fixture
async def via_proxy(deps: Deps, proxy: BillingProxy) -> AsyncIterator[Deps]:
    """The job's dependencies, with Billing reached through the proxy."""
    from service.billing.client import BillingClient, Budget
    from service.payouts.execution import Deps

    client = BillingClient(proxy.url, token=None, timeout=1.0, budget=Budget(1000))
    try:
        yield Deps(deps.pool, client, deps.settings)
    finally:
        await client.aclose()


@pytest.fixture
def system(db_url: str, proxy: BillingProxy, tmp_path: Path) -> Iterator[Cluster]:
    """The API and workers a test starts (none at first), Billing behind the proxy; all
    stopped, their logs shown on a failure, at the end."""
    from tests.helpers.procs import cluster

    with cluster(service_env(db_url, proxy.url), tmp_path) as c:
        yield c


def make_settings(
    db_url: str, billing_url: str = "http://127.0.0.1:9", **overrides: object
) -> Settings:
    """Settings as load() reads them from TEST_ENV (the declared defaults elsewhere), then
    `overrides` by field name; a secret given as text is held as a Secret, as load() does."""
    loaded = settings_module.load({"DATABASE_URL": db_url, "BILLING_URL": billing_url, **TEST_ENV})
    declared = settings_module.variables()
    hidden: dict[str, Any] = {
        field: settings_module.hide(value) if declared[field].secret else value
        for field, value in overrides.items()
    }
    return dataclasses.replace(loaded, **hidden)


def service_env(db_url: str, billing_url: str, **overrides: str) -> dict[str, str]:
    """Environment for service processes started by e2e tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PAYOUT_", "BILLING_", "INSTANT_", "PERIODIC_", "SENTRY_"))
    }
    env.update(
        {
            "DATABASE_URL": db_url,
            "BILLING_URL": billing_url,
            "API_TOKENS": API_TOKEN,
            "ADMIN_TOKENS": ADMIN_TOKEN,
            "BILLING_RPS": "200",
            "BILLING_TIMEOUT_SECONDS": "1",
            "RETRY_BACKOFF_CAP_SECONDS": "1",
            # The fault tests' 30-60 % error rates open the breaker now and then:
            # a second's cool-off keeps them to their time.
            "BILLING_BREAKER_COOLOFF_SECONDS": "1",
            "WORKER_POLL_SECONDS": "0.5",
            "STALLED_JOB_SECONDS": "5",
            # No load balancer to tell: an API stopped at a test's end exits at once, not 5 s
            # later (tests/e2e/test_graceful_stop.py sets its own drain).
            "API_DRAIN_SECONDS": "0",
            "LOG_LEVEL": "INFO",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def pg(db_url: str) -> Iterator[psycopg.Connection[DictRow]]:
    """A plain autocommit connection to the test database, rows as dicts, for setup and checks."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        yield c


@pytest.fixture
def sql(pg: psycopg.Connection[DictRow]) -> psycopg.Connection[DictRow]:
    """`pg` under the name the API tests give it."""
    return pg


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    """A client for the API app on this test's database, its lifespan running."""
    from tests.helpers.api import app_client

    with app_client(db_url) as c:
        yield c
