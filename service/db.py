"""Connection pool factory, statement counting and the named-query loader.

Modules that own SQL take a connection from their caller and never open
one: the caller owns the transaction, so a state change, its audit row and
its job commit together or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import itertools
import logging
import pathlib
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib.resources.abc import Traversable
from typing import Any, LiteralString, cast

import psycopg
import psycopg.errors
import psycopg.rows
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service import observability

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
    observability.DB_QUERIES.labels(process).inc()
    observability.DB_SECONDS.labels(process).observe(seconds)


def connect_kwargs(application_name: str) -> dict[str, Any]:
    return {
        "row_factory": psycopg.rows.dict_row,
        "cursor_factory": CountingCursor,
        "application_name": application_name,
        # Our queries are short OLTP statements; JIT compiling one whose cost
        # estimate crosses the threshold costs more than it ever saves.
        "options": "-c jit=off",
    }


async def _autocommit(conn: Conn) -> None:
    # Set here rather than in connect kwargs: procrastinate opens its LISTEN
    # connection with the pool's kwargs plus its own autocommit=True.
    await conn.set_autocommit(True)


# A connection used less than this long ago is handed out without a probe:
# a round trip per checkout is a fifth of the instant request's statements,
# and a connection broken in the meantime fails its first query, which the
# job retries or the client sees as one 503-able error. Idle longer, it is
# probed, since that is when servers and firewalls drop connections.
PROBE_AFTER_IDLE_SECONDS = 5.0
_returned_at: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()


async def _note_returned(conn: Conn) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: Conn) -> None:
    if time.monotonic() - _returned_at.get(conn, 0.0) > PROBE_AFTER_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


def make_pool(url: str, *, name: str, min_size: int = 1, max_size: int = 10) -> Pool:
    """An unopened pool; `await pool.open(wait=True)` in the process's lifespan.

    Connections are autocommit: every multi-statement unit of work opens an
    explicit ``async with conn.transaction()``, so where a transaction begins
    and ends is visible in the code.
    """
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connect_kwargs(f"fleet-payouts-{name}"),
        configure=_autocommit,
        connection_class=cast(Any, psycopg.AsyncConnection),
        open=False,
        check=_check_if_idle,
        reset=_note_returned,
        name=name,
        timeout=10.0,
    )


async def connect(url: str, *, name: str) -> Conn:
    """One standalone connection (CLI commands, migrations)."""
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=True, **connect_kwargs(f"fleet-payouts-{name}")
    )
    return cast(Conn, conn)


def resource_dir(name: str) -> Traversable:
    """sql/ or migrations/: inside an installed wheel (service.sql), or beside
    the package in a source checkout and an editable install."""
    try:
        return importlib.resources.files(f"service.{name}")
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parent.parent / name


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


async def fetch_one(conn: Conn, query: LiteralString, **params: Any) -> dict[str, Any] | None:
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
            await asyncio.sleep(min(5.0, 0.25 * 2**attempt))
