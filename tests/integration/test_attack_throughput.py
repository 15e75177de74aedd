"""Issue 21's aiohttp client attacked from the wire: a server that answers as no Billing
would (a trickle, a decompression bomb, broken framing), over real TCP sockets.

Each hostile answer must end the call in bounded time and memory as one of the client's own
exceptions (the order stays in flight, resent only by our own logic), and the order must
reach the server exactly once: the transport never re-sends a POST by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from service.billing.client import (
    MAX_ANSWER_BYTES,
    BillingClient,
    BillingPayout,
    Budget,
    Transient,
    Undecided,
)

PAYOUT = b'{"id":"po-1","park_id":"p1","amount":"70.00","currency":"RUB","status":"done"}'
TIMEOUT = 1.0

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def answer(body: bytes, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    """One HTTP/1.1 answer with a Content-Length, `extra` header lines added."""
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + extra
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


@dataclass
class RawServer:
    """A TCP server that reads each request whole and answers with raw bytes."""

    write: Writer
    requests: list[bytes] = field(default_factory=list)
    url: str = ""


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def raw_server(write: Writer) -> AsyncIterator[RawServer]:
    server = RawServer(write)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                server.requests.append(await _read_request(reader))
                await write(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{tcp.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        tcp.close()


async def order(url: str) -> BillingPayout:
    client = BillingClient(url, token="t", timeout=TIMEOUT, budget=Budget(1000))
    try:
        return await client.order_payout(
            "key-1", park_id="p1", amount=Decimal("70.00"), currency="RUB", params={}
        )
    finally:
        await client.aclose()


async def test_an_answer_trickled_a_byte_at_a_time_ends_the_order_in_bounded_time() -> None:
    """An answer whose every read comes within the timeout but never ends (a byte each
    0.2 s) ends the order as Transient within three timeouts, not never."""

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for byte in answer(PAYOUT + b" " * 10_000):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    async with raw_server(trickle) as server:
        started = time.monotonic()
        with pytest.raises(Transient, match="timed out"):
            # The guard only stops a hung test; the client must end first.
            await asyncio.wait_for(order(server.url), 6 * TIMEOUT)
        assert 1 == len(server.requests)
    assert time.monotonic() - started < 3 * TIMEOUT + 1


async def test_a_compressed_bomb_is_refused_without_inflating_it_into_memory() -> None:
    """A gzip answer that inflates to ten times MAX_ANSWER_BYTES (a valid payout padded with
    blanks) is Undecided, and the client holds under twice the cap in memory reading it."""
    inflated = 10 * MAX_ANSWER_BYTES
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = squeeze.compress(PAYOUT)
    blanks = b" " * (1 << 20)
    bomb += b"".join(squeeze.compress(blanks) for _ in range(inflated >> 20))
    bomb += squeeze.flush()

    async def send_bomb(writer: asyncio.StreamWriter) -> None:
        writer.write(answer(bomb, b"Content-Encoding: gzip\r\n"))

    async with raw_server(send_bomb) as server:
        tracemalloc.start()
        try:
            with pytest.raises(Undecided, match="larger than"):
                await order(server.url)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert 1 == len(server.requests)
    assert peak < 2 * MAX_ANSWER_BYTES, f"peak {peak} bytes"


PAYOUT_TO_ANOTHER_REQUEST = (
    b'HTTP/1.1 200 OK\r\nContent-Length: 80\r\n\r\n{"id":"po-EVIL","park_id":"p1",'
    b'"amount":"70.00","currency":"RUB","status":"done"}'
)

# Answers no Billing sends; each must end the order as the client's own exception.
HOSTILE: dict[str, bytes] = {
    "chunked body cut mid-way": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n"
    + PAYOUT[:10],
    "Content-Length shorter than it says": answer(PAYOUT)[:-10],
    "chunked and Content-Length together": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n50\r\n" + PAYOUT[:80] + b"\r\n0\r\n\r\n",
    "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n"
    + PAYOUT,
    "garbage gzip": answer(b"not gzip at all", b"Content-Encoding: gzip\r\n"),
    "brotli (no decoder installed)": answer(b"\x8b\x03\x80" + PAYOUT, b"Content-Encoding: br\r\n"),
    "a header line of 100 kB": answer(PAYOUT, b"X-Big: " + b"a" * 100_000 + b"\r\n"),
    "20,000 headers": answer(PAYOUT, b"".join(b"X-%d: a\r\n" % i for i in range(20_000))),
    "NUL in a header": answer(PAYOUT, b"X-N: a\x00b\r\n"),
    "no HTTP at all": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "a four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "non-UTF-8 JSON": answer(b'{"id":"po-\xff","park_id":"p1","amount":"70.00","currency":"RUB"}'),
    "duplicate key changing the amount": answer(PAYOUT[:-1] + b',"amount":"7000.00"}'),
    "a 307 back to the same path": answer(b"", b"Location: /v1/payouts\r\n", b"307 Redirect"),
    "a 200 with the next answer smuggled after it": answer(b"{}") + PAYOUT_TO_ANOTHER_REQUEST,
    "closed before any answer": b"",
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_answer_ends_the_order_as_transient_and_it_was_sent_once(
    raw: bytes,
) -> None:
    """Each answer no Billing sends ends the order as Transient (Undecided included), with the
    order sent once: aiohttp neither re-sends a POST nor reads a smuggled answer as ours."""

    async def hostile(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    async with raw_server(hostile) as server:
        with pytest.raises(Transient):
            await asyncio.wait_for(order(server.url), 6 * TIMEOUT)
        assert 1 == len(server.requests)


async def test_answers_billing_may_send_oddly_framed_still_pay() -> None:
    """An HTTP/1.0 answer read to the close, a 100 Continue first, a Set-Cookie and an unknown
    Content-Encoding on a plain body each still give the order's payout, one request each."""
    for raw in (
        b"HTTP/1.0 200 OK\r\n\r\n" + PAYOUT,
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(PAYOUT),
        answer(PAYOUT, b"Set-Cookie: session=evil; Path=/\r\n"),
        answer(PAYOUT, b"Content-Encoding: identity\r\n"),
    ):

        async def odd(writer: asyncio.StreamWriter, raw: bytes = raw) -> None:
            writer.write(raw)
            await writer.drain()
            writer.close()

        async with raw_server(odd) as server:
            made = await asyncio.wait_for(order(server.url), 6 * TIMEOUT)
            assert ("po-1", Decimal("70.00")) == (made.id, made.amount)
            assert 1 == len(server.requests)


async def test_a_keep_alive_connection_closed_between_orders_never_resends_one() -> None:
    """When the server closes the kept-alive connection after each answer (no Connection:
    close said), each order reaches it at most once, and exactly the orders it answered pay:
    one sent on the stale connection ends Transient, never re-sent by aiohttp."""
    paid: list[bytes] = []
    async with raw_server(lambda writer: _answer_and_close(writer)) as server:
        client = BillingClient(server.url, token="t", timeout=TIMEOUT, budget=Budget(1000))
        try:
            for n in range(5):
                with contextlib.suppress(Transient):
                    await client.order_payout(
                        f"key-{n}", park_id="p1", amount=Decimal("70.00"), currency="RUB",
                        params={},
                    )  # fmt: skip
                    paid.append(f"key-{n}".encode())
        finally:
            await client.aclose()
        keys = [r.split(b"Idempotency-Key: ", 1)[1].split(b"\r\n", 1)[0] for r in server.requests]
    assert paid == keys


async def _answer_and_close(writer: asyncio.StreamWriter) -> None:
    writer.write(answer(PAYOUT))
    await writer.drain()
    writer.close()


# --- the job counts kept by triggers (migrations/0015) ----------------------------------

JOB_OPS = (
    # procrastinate's own functions, as its workers and its admin call them
    "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW('q', 't', 0, NULL, NULL, '{}'::jsonb,"
    " NULL)::procrastinate_job_to_defer_v1, ROW('q', 't', 0, NULL, NULL, '{}'::jsonb,"
    " NULL)::procrastinate_job_to_defer_v1])",
    "SELECT procrastinate_fetch_job_v2(ARRAY['q'], NULL)",
    "SELECT procrastinate_finish_job_v1(id, 'succeeded', false) FROM procrastinate_jobs"
    " WHERE status = 'doing' ORDER BY random() LIMIT 1",
    "SELECT procrastinate_finish_job_v1(id, 'failed', false) FROM procrastinate_jobs"
    " WHERE status = 'doing' ORDER BY random() LIMIT 1",
    "SELECT procrastinate_finish_job_v1(id, 'succeeded', true) FROM procrastinate_jobs"
    " WHERE status = 'doing' ORDER BY random() LIMIT 1",
    "SELECT procrastinate_retry_job_v2(id, now(), NULL, NULL, NULL) FROM procrastinate_jobs"
    " WHERE status = 'doing' AND NOT abort_requested ORDER BY random() LIMIT 1",
    "SELECT procrastinate_cancel_job_v1(id, false, false) FROM procrastinate_jobs"
    " WHERE status = 'todo' ORDER BY random() LIMIT 1",
    "SELECT procrastinate_cancel_job_v1(id, true, false) FROM procrastinate_jobs"
    " WHERE status = 'doing' ORDER BY random() LIMIT 1",
    "SELECT procrastinate_cancel_job_v1(id, false, true) FROM procrastinate_jobs"
    " WHERE status = 'todo' ORDER BY random() LIMIT 1",
    # a DBA by hand, and housekeeping's kind of batch
    "DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM procrastinate_jobs"
    " WHERE status IN ('failed', 'cancelled', 'succeeded') ORDER BY id LIMIT 1)",
    "UPDATE procrastinate_jobs SET status = 'todo', abort_requested = false"
    " WHERE id IN (SELECT id FROM procrastinate_jobs WHERE status = 'failed'"
    " ORDER BY random() LIMIT 1)",
)


def _counts_agree(pg: Any) -> tuple[dict[str, int], dict[str, int]]:
    kept = {
        r["status"]: int(r["n"])
        for r in pg.execute(
            "SELECT status::text AS status, sum(n) AS n FROM job_status_counts GROUP BY 1"
        )
        if r["n"]
    }
    counted = {
        r["status"]: int(r["n"])
        for r in pg.execute(
            "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs GROUP BY 1"
        )
    }
    return counted, kept


def test_job_counts_equal_count_star_after_concurrent_sessions_and_rollbacks(
    db_url: str, pg: Any
) -> None:
    """After eight sessions run procrastinate's defer, fetch, finish, retry, cancel and abort,
    a DBA's DELETE and UPDATE, a third of them rolled back, the kept counts equal count(*)
    by status, and no session met a deadlock."""
    import random
    import threading

    import psycopg

    deadlocks: list[str] = []
    others: list[str] = []

    def session(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(db_url) as c:
            for _ in range(150):
                try:
                    with c.transaction():
                        # One statement per transaction, as procrastinate and the service
                        # run them (several in random order deadlock on the jobs' own rows).
                        c.execute(rng.choice(JOB_OPS))
                        if rng.random() < 0.33:
                            raise _Rollback
                except _Rollback:
                    pass
                except psycopg.errors.DeadlockDetected as exc:
                    deadlocks.append(str(exc).replace("\n", " | "))
                except (psycopg.errors.RaiseException, psycopg.errors.CheckViolation):
                    # procrastinate's "job not found" when another session won it, and its
                    # retry of a job whose abort was asked meanwhile (its own race)
                    pass
                except psycopg.Error as exc:
                    others.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    counted, kept = _counts_agree(pg)
    assert counted == kept, f"deadlocks {deadlocks}, other errors {others}"
    assert sum(counted.values()) > 0
    assert [] == deadlocks, "\n".join(deadlocks)
    assert [] == others


class _Rollback(Exception):
    """Ends a transaction by rolling it back."""


def test_job_counts_follow_truncate_in_a_transaction_and_its_rollback(pg: Any) -> None:
    """TRUNCATE (with CASCADE, inside a transaction with inserts after it) empties the counts
    with the table, and its rollback brings both back: the counts equal count(*) each time."""
    pg.execute(JOB_OPS[0])
    pg.execute(JOB_OPS[1])
    with contextlib.suppress(_Rollback), pg.transaction():
        pg.execute("TRUNCATE procrastinate_jobs CASCADE")
        pg.execute(JOB_OPS[0])
        assert _counts_agree(pg)[0] == _counts_agree(pg)[1]
        raise _Rollback
    counted, kept = _counts_agree(pg)
    assert {"todo": 1, "doing": 1} == counted
    assert counted == kept
    pg.execute("TRUNCATE procrastinate_jobs CASCADE")
    pg.execute(JOB_OPS[0])
    assert ({"todo": 2}, {"todo": 2}) == _counts_agree(pg)


# --- the shared gate's ledger (sql/billing.sql, claim_slots) -----------------------------


async def test_an_urgent_claim_that_gets_nothing_never_moves_the_next_slot_back(
    pool: Any,
) -> None:
    """At BILLING_RPS=0.5 (slots 2.1 s apart), an urgent claim made right after a slot was
    handed out gets its own slot no less than one spacing after it: a claim that got nothing
    must not pull the ledger's next slot back to within a second (two calls in one second)."""
    from service.billing import gate as billing_gate
    from service.core import db

    spacing_us = billing_gate.spacing_us(0.5)

    async def claim(conn: Any, *, urgent: bool) -> Any:
        return await db.fetch_one(
            conn,
            billing_gate.Q["claim_slots"],
            want=1,
            urgent=urgent,
            spacing_us=spacing_us,
            lease_us=round(billing_gate.LEASE_SECONDS * 1_000_000),
            probe_lease_us=1,
        )

    async with pool.connection() as conn:
        first = await claim(conn, urgent=False)
        assert 1 == first["slots"]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * spacing_us / 1e6 + 1
        while True:
            # The urgent caller comes back as the gate does, until a slot is its own.
            second = await claim(conn, urgent=True)
            if second["slots"] or loop.time() > give_up:
                break
            await asyncio.sleep(0.02)
    assert 1 == second["slots"]
    gap = second["first_at"] - first["first_at"]
    assert gap >= spacing_us / 1e6 - 1e-6, f"two slots {gap:.3f} s apart at 0.5 calls/s"
