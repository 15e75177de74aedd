"""Connection pool factory, statement counting and the named-query loader.

Modules that own SQL take a connection from their caller and never open
one: the caller owns the transaction, so a state change, its audit row and
its job commit together or not at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.resources
import itertools
import logging
import pathlib
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from importlib.resources.abc import Traversable
from typing import Any, LiteralString, TypeVar, cast

import psycopg
import psycopg.errors
import psycopg.rows
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service.core import observability, retry
from service.core.invariant import InvariantError

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[psycopg.rows.DictRow]
Pool = AsyncConnectionPool[Conn]

_BLOCK_RE = re.compile(r"^-- ([a-z_]+) --\n(?:--.*\n)*", re.MULTILINE)


class CountingCursor(psycopg.AsyncCursor[psycopg.rows.Row]):
    """Counts and times every statement, for fleet_payouts_db_queries_total.

    Installed as the connections' cursor_factory, so procrastinate's own
    queries on our pool are counted too.
    """

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await super().execute(query, params, **kwargs)
        finally:
            _record(time.perf_counter() - start)

    async def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            await super().executemany(query, params_seq, **kwargs)
        finally:
            _record(time.perf_counter() - start)


def _record(seconds: float) -> None:
    process = observability.PROCESS["name"]
    children = _METRICS.get(process)
    if children is None:
        # labels() validates and locks on every call: the children are looked up once.
        children = (
            observability.DB_QUERIES.labels(process),
            observability.DB_SECONDS.labels(process),
        )
        _METRICS[process] = children
    children[0].inc()
    children[1].observe(seconds)


_METRICS: dict[str, tuple[Any, Any]] = {}


# A session that stops mid-transaction (a frozen worker: SIGSTOP, a paused
# VM) would keep its row locks, and the parks behind them, for as long as it
# sleeps. The server ends such a transaction after this long instead.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000


def connect_kwargs(
    application_name: str, session: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Connection arguments; `session` adds server settings (statement_timeout...)."""
    # Our queries are short OLTP statements; JIT compiling one whose cost
    # estimate crosses the threshold costs more than it ever saves.
    options = {
        "jit": "off",
        "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_TIMEOUT_MS),
        **(session or {}),
    }
    return {
        # No server-side prepared statements: a column added by an expand migration
        # (a rolling deploy runs it beside warm pools) would fail every prepared
        # `SELECT p.*` with `cached plan must not change result type` until the
        # process restarts (psycopg's maintainer advises exactly this). The price,
        # measured: a one-row read by key 0.20-0.24 ms prepared, 0.44-0.45 unprepared.
        "prepare_threshold": None,
        "row_factory": psycopg.rows.dict_row,
        "cursor_factory": CountingCursor,
        "application_name": application_name,
        "options": " ".join(f"-c {name}={value}" for name, value in options.items()),
    }


class DatabaseClock:
    """The database's clock as seen from this host.

    Time rules are decided by PostgreSQL's clock in SQL. What must be written
    as a timestamp from Python (procrastinate's retry_at, compared with the
    database's now() by every worker) is this host's clock corrected by the
    offset last observed, so a host whose clock is off by hours still
    schedules retries at the right moment.
    """

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def observe(self, db_now: datetime) -> None:
        self._offset = db_now - datetime.now(UTC)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset


CLOCK = DatabaseClock()


def timeouts(*, statement_seconds: float, lock_seconds: float | None = None) -> dict[str, str]:
    """Server-side limits for a request-path pool, in the `session` form of make_pool."""
    found = {"statement_timeout": f"{max(1, round(statement_seconds * 1000))}ms"}
    if lock_seconds is not None:
        found["lock_timeout"] = f"{max(1, round(lock_seconds * 1000))}ms"
    return found


async def _autocommit(conn: Conn) -> None:
    # Set here rather than in connect kwargs: procrastinate opens its LISTEN
    # connection with the pool's kwargs plus its own autocommit=True.
    await conn.set_autocommit(True)
    await _utc(conn)


# Time rules add intervals to timestamps in SQL (`now() + '3 days'`: psycopg sends a
# timedelta of 72 hours so), which PostgreSQL does in the session's TimeZone: in a zone
# with DST, 3 days are 71 or 73 hours. Every session runs in UTC, whatever the
# database's or the role's default or a host's PGTZ (which libpq sends after `options`,
# so it wins over a `-c TimeZone` there): hosts decide alike.
async def _utc(conn: Conn) -> None:
    await conn.execute("SET TimeZone = 'UTC'")


# A connection handed out less than this long ago is handed out again without
# a probe: a round trip per checkout is a fifth of the instant request's
# statements, and a connection broken in the meantime fails its first query,
# which the job retries or the client sees as one 503-able error. Idle longer,
# it is probed, since that is when servers and firewalls drop connections.
# The clock starts when the connection is handed out, not when it comes back
# (its idle time is at most that): a `reset` callback would note the return,
# but with one psycopg_pool returns every connection through a worker task, a
# hop through the event loop on every press (issue 21).
PROBE_AFTER_IDLE_SECONDS = 5.0
_handed_out_at: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()


async def _check_if_idle(conn: Conn) -> None:
    now = time.monotonic()
    if now - _handed_out_at.get(conn, 0.0) > PROBE_AFTER_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)
    _handed_out_at[conn] = now


def make_pool(
    url: str,
    *,
    name: str,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 10.0,
    session: Mapping[str, str] | None = None,
) -> Pool:
    """An unopened pool; `await pool.open(wait=True)` in the process's lifespan.

    Connections are autocommit: every multi-statement unit of work opens an
    explicit ``async with conn.transaction()``, so where a transaction begins
    and ends is visible in the code. `timeout` bounds the wait for a free
    connection (PoolTimeout); `session` sets server settings on each one.
    """
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connect_kwargs(f"fleet-payouts-{name}", session),
        configure=_autocommit,
        connection_class=cast(Any, psycopg.AsyncConnection),
        open=False,
        check=_check_if_idle,
        name=name,
        timeout=timeout,
    )


async def connect(url: str, *, name: str) -> Conn:
    """One standalone connection (CLI commands, migrations)."""
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=True, **connect_kwargs(f"fleet-payouts-{name}")
    )
    await _utc(cast(Conn, conn))
    return cast(Conn, conn)


def resource_dir(name: str) -> Traversable:
    """sql/ or migrations/: inside an installed wheel (service.sql), or beside
    the package in a source checkout and an editable install."""
    try:
        return importlib.resources.files(f"service.{name}")
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parents[2] / name


@functools.cache
def queries(family: str) -> Mapping[str, LiteralString]:
    """The named queries of sql/<family>.sql, blocks headed ``-- name --``."""
    text = resource_dir("sql").joinpath(f"{family}.sql").read_text("utf-8")
    found: dict[str, LiteralString] = {}
    matches = list(_BLOCK_RE.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        found[match.group(1)] = text[match.end() : end].strip()
    return found


def _adapt(params: Mapping[str, Any]) -> dict[str, Any]:
    # dicts are JSON documents (params, details): send them as jsonb.
    return {k: Jsonb(v) if isinstance(v, dict) else v for k, v in params.items()}


T = TypeVar("T")


# Walked once per class: fetch_as and build run on the press's and the gate's hot paths.
_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _fields(cls: type[Any]) -> tuple[str, ...]:
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    return found


def build(cls: type[T], row: Mapping[str, Any]) -> T:
    """A frozen dataclass from a row read as a mapping (one whose other columns a caller
    reads first); columns it does not declare are dropped, as by `row_as`."""
    return cls(**{name: row[name] for name in _fields(cls)})


def row_as(cls: type[T]) -> psycopg.rows.BaseRowFactory[T]:
    """Rows as instances of a frozen dataclass; columns it does not declare are dropped."""
    fields = _fields(cls)
    names = set(fields)

    def factory(cursor: Any) -> Any:
        columns = tuple(c.name for c in cursor.description or ())
        if columns == fields:
            # The query selects exactly the fields, in order (audit verify reads
            # millions so): positional, without a dict per row.
            return lambda values: cls(*values)

        def make(values: Any) -> T:
            return cls(**{k: v for k, v in zip(columns, values, strict=True) if k in names})

        return make

    return factory


async def fetch_as(conn: Conn, cls: type[T], query: LiteralString, **params: Any) -> T | None:
    """One row as a `cls` (a frozen dataclass), or None."""
    async with conn.cursor(row_factory=row_as(cls)) as cur:
        await cur.execute(query, _adapt(params))
        return await cur.fetchone()


async def fetch_value(conn: Conn, cls: type[T], query: LiteralString, **params: Any) -> T | None:
    """The first column of the first row, checked to be a `cls`; None for no row or NULL.

    For the one-number answers (a count, a flag, a clock): no dataclass of one field."""
    async with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
        await cur.execute(query, _adapt(params))
        row = await cur.fetchone()
    value = None if row is None else row[0]
    return None if value is None else _checked(cls, value)


async def fetch_values(conn: Conn, cls: type[T], query: LiteralString, **params: Any) -> list[T]:
    """The first column of every row, each checked to be a `cls` (a NULL among them is an
    InvariantError): a list of keys or statements, no dataclass of one field."""
    async with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
        await cur.execute(query, _adapt(params))
        rows = await cur.fetchall()
    return [_checked(cls, row[0]) for row in rows]


def _checked(cls: type[T], value: object) -> T:
    if not isinstance(value, cls):
        raise InvariantError(f"expected {cls.__name__}, the query answered {type(value).__name__}")
    return value


async def fetch_all_as(conn: Conn, cls: type[T], query: LiteralString, **params: Any) -> list[T]:
    """Every row as a `cls` (a frozen dataclass)."""
    async with conn.cursor(row_factory=row_as(cls)) as cur:
        await cur.execute(query, _adapt(params))
        return await cur.fetchall()


async def fetch_one(conn: Conn, query: LiteralString, **params: Any) -> dict[str, Any] | None:
    """One row as a mapping, for a store's own use: what leaves a store is a dataclass
    (fetch_as), tests/unit/test_typed_rows.py sees to that."""
    cur = await conn.execute(query, _adapt(params))
    return await cur.fetchone()


async def fetch_all(conn: Conn, query: LiteralString, **params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query, _adapt(params))
    return await cur.fetchall()


async def execute(conn: Conn, query: LiteralString, **params: Any) -> int:
    cur = await conn.execute(query, _adapt(params))
    return cur.rowcount


# DDL waits for every transaction that holds a lock it needs, and everything that
# needs the table after it queues behind it: a migration stuck behind a long report
# would hold up every press for as long. So schema changes wait at most this long for
# their locks, roll back, and try again a little later.
DDL_LOCK_TIMEOUT = "1s"
DDL_ATTEMPTS = 20


async def ddl_transaction(conn: Conn, body: Callable[[], Awaitable[None]], what: str) -> None:
    """Run `body` in one transaction whose lock waits are short; retry it on a lock timeout."""
    for attempt in itertools.count(1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                await body()
            return
        except psycopg.errors.LockNotAvailable:
            if attempt >= DDL_ATTEMPTS:
                raise
            logger.warning("%s: a lock was not free within %s; retrying", what, DDL_LOCK_TIMEOUT)
            await asyncio.sleep(retry.delay(attempt, base=0.25, cap=5.0))
