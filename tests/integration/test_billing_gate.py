"""The shared Billing gate against a real database: the slot ledger, the shared pause and the
breaker. Several SharedGate objects on one database stand for several worker processes.

Time is never waited out: where a cool-off must be over, the test moves the gate row's
`paused_until` into the past, as the clock would.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import DictRow

from service.billing import gate as billing_gate
from service.billing.client import BillingClient, Paused, Permit, Transient
from service.billing.gate import SharedGate
from service.core import db
from tests.helpers.api import set_faults, stats
from tests.helpers.emulator import peak_in_one_second

COOLOFF = 30.0


@pytest.fixture
def make_gate(pool: db.Pool) -> Callable[..., SharedGate]:
    """A factory of gates on the test's database: each one a worker process of its own."""

    def make(rps: float = 100.0, failures: int = 3) -> SharedGate:
        return SharedGate(
            pool,
            rps=rps,
            breaker_failures=failures,
            breaker_cooloff_seconds=COOLOFF,
            probe_lease_seconds=5.0,
        )

    return make


def gate_row(pg: psycopg.Connection[DictRow]) -> dict[str, Any]:
    row = pg.execute("SELECT * FROM billing_gate").fetchone()
    assert row is not None
    return row


def end_cooloff(pg: psycopg.Connection[DictRow]) -> None:
    """The cool-off runs out, as the clock would make it."""
    pg.execute("UPDATE billing_gate SET paused_until = clock_timestamp()")


def paused_gauge() -> float | None:
    return REGISTRY.get_sample_value("fleet_payouts_billing_breaker_open")


# --- the budget --------------------------------------------------------------------------


async def test_concurrent_claims_never_hand_out_slots_closer_than_one_spacing(
    pool: db.Pool,
) -> None:
    """Claims racing from four connections get slots that are all at least one spacing apart."""
    spacing = 1000  # microseconds

    async def claim_many(conn_no: int) -> list[float]:
        times = []
        async with pool.connection() as conn:
            for _ in range(50):
                row = await db.fetch_one(
                    conn,
                    billing_gate.Q["claim_slots"],
                    want=3,
                    urgent=False,
                    spacing_us=spacing,
                    lease_us=10_000_000,  # always grant: only the spacing is under test
                    probe_lease_us=1,
                )
                assert row is not None
                times += [row["first_at"] + i * spacing / 1e6 for i in range(row["slots"])]
        return times

    slots = sorted(itertools.chain(*await asyncio.gather(*(claim_many(i) for i in range(4)))))

    assert 600 == len(slots)
    closest = min(b - a for a, b in itertools.pairwise(slots))
    assert closest >= spacing / 1e6 - 1e-6, f"two slots only {closest * 1e6:.1f} us apart"


async def test_three_gates_together_stay_within_the_budget_in_every_second(
    make_gate: Callable[..., SharedGate],
) -> None:
    """Three processes with ten eager callers each get at most BILLING_RPS + 1 permits in any
    one-second window, and never two closer than one spacing less the send window.
    """
    rps = 20
    gates = [make_gate(rps=rps) for _ in range(3)]
    loop = asyncio.get_running_loop()
    permits: list[float] = []
    stop_at = loop.time() + 2.5

    async def caller(gate: SharedGate) -> None:
        while loop.time() < stop_at:
            await gate.acquire()
            permits.append(loop.time())

    await asyncio.gather(*(caller(g) for g in gates for _ in range(10)))

    assert peak_in_one_second(permits) <= rps + 1
    closest = min(b - a for a, b in itertools.pairwise(sorted(permits)))
    assert closest >= 1 / rps - billing_gate.SEND_WINDOW_SECONDS
    assert len(permits) >= 2 * rps, "the callers were starved, not paced"


async def test_a_vanished_process_takes_no_more_than_its_lease_with_it(
    make_gate: Callable[..., SharedGate], pool: db.Pool
) -> None:
    """A process that claimed every slot it could and died holds the others back by at most
    the lease: its share is back at once, not after a heartbeat times out.
    """
    survivor = make_gate(rps=1000)
    async with pool.connection() as conn:
        grabbed = await db.fetch_one(
            conn,
            billing_gate.Q["claim_slots"],
            want=10_000,
            urgent=False,
            spacing_us=survivor.spacing_us,
            lease_us=round(billing_gate.LEASE_SECONDS * 1e6),
            probe_lease_us=1,
        )
    assert grabbed is not None and grabbed["slots"] > 10, "the dying process got no slots"
    loop = asyncio.get_running_loop()

    started = loop.time()
    await survivor.acquire()

    assert loop.time() - started < billing_gate.LEASE_SECONDS + 0.2


def test_spacing_spends_95_percent_and_tolerates_the_send_window_and_more() -> None:
    """Slots are spaced for 95 % of the budget, so that a second plus the send window plus tens
    of milliseconds more still holds at most R + 1 of them.
    """
    for rps in (1, 4, 10, 20, 100, 1000, 10_000):
        spacing = billing_gate.spacing_us(rps) / 1e6
        assert 0.94 * rps <= 1 / spacing <= 0.95 * rps  # slots are whole microseconds
        delay = billing_gate.tolerated_delay(rps)
        assert delay >= billing_gate.SEND_WINDOW_SECONDS + 0.025
        assert math.ceil((1 + delay) / spacing - 1e-9) <= rps + 1


# --- the shared pause -------------------------------------------------------------------------


async def test_a_429_pauses_every_process_for_its_retry_after(
    make_gate: Callable[..., SharedGate], pg: psycopg.Connection[DictRow]
) -> None:
    """A Retry-After reported by one process makes another raise Paused for about that long."""
    throttled, other = make_gate(), make_gate()
    permit = await throttled.acquire()

    await throttled.report(permit, "throttled", retry_after=2.0)

    with pytest.raises(Paused) as caught:
        await other.acquire()
    assert 1.5 < caught.value.retry_after <= 2.0
    assert "throttled" == gate_row(pg)["pause_reason"]
    await other.refresh()
    assert 1.0 == paused_gauge()


# --- the breaker --------------------------------------------------------------------------------


async def open_breaker(gate: SharedGate, failures: int = 3) -> None:
    for _ in range(failures):
        permit = await gate.acquire()
        await gate.report(permit, "failed")


async def test_breaker_opens_after_a_run_of_failures_and_one_probe_closes_it(
    make_gate: Callable[..., SharedGate], pg: psycopg.Connection[DictRow]
) -> None:
    """Three failures in a row (threshold 3) pause every process; after the cool-off one process
    gets the single probe while the others stay paused, and the probe's answer closes it.
    """
    failing, prober, other = make_gate(), make_gate(), make_gate()

    await open_breaker(failing)

    assert (True, 3) == (gate_row(pg)["breaker_open"], gate_row(pg)["consecutive_failures"])
    with pytest.raises(Paused) as caught:
        await prober.acquire()
    assert COOLOFF - 1 < caught.value.retry_after <= COOLOFF
    await other.refresh()
    assert 1.0 == paused_gauge()

    end_cooloff(pg)
    await prober.refresh()
    probe = await prober.acquire()
    assert probe.probe
    with pytest.raises(Paused):
        await other.acquire()

    await prober.report(probe, "answered")

    assert (False, 0) == (gate_row(pg)["breaker_open"], gate_row(pg)["consecutive_failures"])
    await other.refresh()
    assert Permit(probe=False) == await other.acquire()
    assert 0.0 == paused_gauge()


async def test_a_failed_probe_opens_the_breaker_for_another_cool_off(
    make_gate: Callable[..., SharedGate], pg: psycopg.Connection[DictRow]
) -> None:
    """The probe failing pauses every process for a whole new cool-off."""
    gate, other = make_gate(), make_gate()
    await open_breaker(gate)
    end_cooloff(pg)
    await gate.refresh()
    probe = await gate.acquire()

    await gate.report(probe, "failed")

    with pytest.raises(Paused) as caught:
        await other.acquire()
    assert COOLOFF - 1 < caught.value.retry_after <= COOLOFF
    assert (True, None) == (gate_row(pg)["breaker_open"], gate_row(pg)["probe_until"])


async def test_an_answer_breaks_the_run_of_failures(
    make_gate: Callable[..., SharedGate], pg: psycopg.Connection[DictRow]
) -> None:
    """Failures separated by an answer from Billing are not consecutive: the breaker stays shut."""
    gate = make_gate()
    await open_breaker(gate, failures=2)
    await gate.report(await gate.acquire(), "answered")
    await open_breaker(gate, failures=2)

    assert (False, 2) == (gate_row(pg)["breaker_open"], gate_row(pg)["consecutive_failures"])
    assert not (await gate.acquire()).probe


# --- through the client, against the emulator over HTTP ------------------------------------------


@pytest.fixture
async def clients(
    make_gate: Callable[..., SharedGate], billing_url: str
) -> AsyncIterator[list[BillingClient]]:
    """Two Billing clients, each with the gate of a process of its own."""
    made = [
        BillingClient(billing_url, token=None, timeout=2.0, budget=make_gate()) for _ in range(2)
    ]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


async def test_while_throttled_no_process_calls_billing(
    clients: list[BillingClient], billing_url: str
) -> None:
    """After a 429 with Retry-After 3, calls from any process raise Paused without reaching
    Billing, and the wait for the budget is measured.
    """
    set_faults(billing_url, throttle_rate=1.0, retry_after_s=3)
    waits = REGISTRY.get_sample_value("fleet_payouts_billing_budget_wait_seconds_count") or 0

    with pytest.raises(Paused) as first:
        await clients[0].balance("p1")
    assert 3.0 == first.value.retry_after
    for client in clients:
        with pytest.raises(Paused):
            await client.balance("p1")

    assert 1 == stats(billing_url)["requests"]
    assert waits + 1 == REGISTRY.get_sample_value("fleet_payouts_billing_budget_wait_seconds_count")


async def test_breaker_stops_calls_to_a_failing_billing(
    clients: list[BillingClient], billing_url: str
) -> None:
    """Three 503s in a row (threshold 3) are Transient; the next call from either process is
    Paused and never reaches Billing.
    """
    set_faults(billing_url, error_rate=1.0)
    for n in range(3):
        with pytest.raises(Transient) as caught:
            await clients[n % 2].balance("p1")
        assert not isinstance(caught.value, Paused)

    for client in clients:
        with pytest.raises(Paused):
            await client.balance("p1")
    assert 3 == stats(billing_url)["requests"]


# --- claims and priorities ---------------------------------------------------------------


async def test_calls_one_after_another_share_claims_at_a_high_rate(
    make_gate: Callable[..., SharedGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 calls made one after another at BILLING_RPS=1000 cost at most 75 claims (one per
    call before): each claim takes ahead what the next lease uses at the rate of the last
    ones, not one slot per call. (About 20-33 here; the bound leaves room for a loaded
    machine, where the calls' own rate, which sizes each claim, is lower.)"""
    gate = make_gate(rps=1000)
    claims = []
    fetch_as = db.fetch_as

    async def counted(conn: Any, cls: Any, query: Any, **params: Any) -> Any:
        if query == billing_gate.Q["claim_slots"]:
            claims.append(params["want"])
        return await fetch_as(conn, cls, query, **params)

    monkeypatch.setattr(db, "fetch_as", counted)
    before = REGISTRY.get_sample_value("fleet_payouts_billing_slot_claims_total") or 0.0

    for _ in range(300):
        await gate.acquire()

    assert len(claims) <= 75, claims
    after = REGISTRY.get_sample_value("fleet_payouts_billing_slot_claims_total") or 0.0
    assert len(claims) == after - before


async def test_an_urgent_call_passes_every_call_waiting_in_its_process(
    make_gate: Callable[..., SharedGate],
) -> None:
    """With ten periodic calls waiting at BILLING_RPS=20, an urgent call that arrives after them
    gets its permit before at least eight of them."""
    gate = make_gate(rps=20)
    order: list[str] = []

    async def call(name: str, urgent: bool) -> None:
        await gate.acquire(urgent=urgent)
        order.append(name)

    periodic = [asyncio.create_task(call(f"p{i}", False)) for i in range(10)]
    await asyncio.sleep(0)  # they are all waiting before the urgent one arrives
    await call("urgent", True)
    await asyncio.gather(*periodic)

    assert order.index("urgent") <= 2, order


async def test_an_urgent_call_waits_about_one_slot_while_other_processes_are_busy(
    make_gate: Callable[..., SharedGate],
) -> None:
    """At BILLING_RPS=10 three other processes' eager periodic callers claim every slot they
    can; at least six of eight urgent calls of this process still get their permit within
    0.25 s (one slot is 0.105 s): its claim keeps the next free slot for it. Racing the three
    for each slot instead, about half of them would wait longer."""
    busy = [make_gate(rps=10) for _ in range(3)]
    mine = make_gate(rps=10)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def eager(gate: SharedGate) -> None:
        while not done.is_set():
            await gate.acquire()

    callers = [asyncio.create_task(eager(g)) for g in busy for _ in range(4)]
    try:
        await asyncio.sleep(0.3)  # the busy processes are claiming
        waits = []
        for _ in range(8):
            started = loop.time()
            await mine.acquire(urgent=True)
            waits.append(loop.time() - started)
    finally:
        done.set()
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)

    assert sum(1 for w in waits if w < 0.25) >= 6, waits
