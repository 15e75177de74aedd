"""The gate every call to Billing passes, shared by all hosts through the database.

**Budget (SPEC section 4): at most BILLING_RPS + 1 calls leave the service in
any one-second window, however many workers run, join or die.** The database
keeps a ledger of send slots (``billing_gate.next_slot_at``, a generic cell
rate algorithm on the database's clock): a process claims the slots of the
next ``LEASE_SECONDS`` in one update, each slot ``spacing`` apart and none
closer to any slot of any other host. A slot is a send time: its call leaves
no earlier than the slot (on the database clock, as far as this process can
tell) and no later than ``SEND_WINDOW_SECONDS`` after it, or not at all.

Why that holds the budget: calls arriving at Billing in a window [a, a+1) used
slots in (a - D, a + 1), where D bounds the delay from a slot to its arrival
(the send window, then the wire and both ends' schedulers). That interval
holds at most ceil((1 + D) / spacing) slots. Slots are spaced for
``BUDGET_SHARE`` (95 %) of R, so this is at most R + 1 for any D up to
``tolerated_delay(R)`` = (R + 1) / (0.95 R) - 1: 320 ms at R = 4, 160 ms at
R = 10, 63 ms at R = 100, 54 ms at R = 1,000. The 5 % buys tolerance for the
tens of milliseconds a loaded host adds between deciding to call and Billing
receiving it; the +1 alone would buy only 1/R seconds of it.

A process that dies loses only the slots it had claimed, at most
LEASE_SECONDS' worth: its share is back at once, without waiting for a
heartbeat to go stale. Nothing is handed out ahead, so a newcomer needs no
warm-up either. Local pacing is the slot times themselves; aiolimiter paces
``Budget``, the single-process gate.

**Shared back-off and breaker.** A 429's Retry-After, and the breaker's
cool-off after ``breaker_failures`` transient failures in a row (all hosts
together), set ``paused_until`` for every host; a claim during a pause, or
while another host's single probe is out, raises ``Paused`` without calling
Billing. A process learns of a pause at its next claim (at most LEASE_SECONDS
away while it is calling) or from ``refresh`` (the gauge, once a second).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import math

import psycopg
import psycopg_pool

from service.billing.client import BillingClient, Outcome, Paused, Permit, pause_seconds
from service.core import db, observability
from service.core.invariant import InvariantError
from service.core.settings import Settings

logger = logging.getLogger(__name__)
Q = db.queries("billing")

# How far ahead of its send time a slot is handed out. It bounds the budget a
# dead process can take with it and how long a pause takes to reach a host
# that is calling; a claim's round trip must fit in it many times over.
LEASE_SECONDS = 0.05
# A slot whose call could not leave within this of its time is dropped
# unused: a late call bunched with the next ones would break the budget.
SEND_WINDOW_SECONDS = 0.025
# Slots are spaced for this share of BILLING_RPS: the rest, with the +1 of
# the contract, absorbs the delay between a slot and Billing's clock.
BUDGET_SHARE = 0.95
# While another host's probe is out, look again this often (the probe's
# lease can be as long as a Billing timeout).
PROBE_RECHECK_SECONDS = 1.0
# A claim takes, besides the slots its waiting calls need, what the next lease
# will use at the rate slots were handed out over this long: at a high rate one
# claim serves many calls, and at most one lease's worth goes unused when the
# rate falls.
RATE_WINDOW_SECONDS = 0.25


def spacing_us(rps: float) -> int:
    """Microseconds between two slots for a budget of `rps` calls per second."""
    return math.ceil(1_000_000 / (BUDGET_SHARE * rps))


def tolerated_delay(rps: float) -> float:
    """The most a slot's call may be delayed (send window, wire, schedulers included)
    with Billing still counting at most rps + 1 calls in every second."""
    return (rps + 1) * spacing_us(rps) / 1_000_000 - 1


@dataclasses.dataclass(frozen=True)
class _Clock:
    """The database's clock as seen from this process's monotonic clock.

    The database read ``db_now`` at some local moment in [sent, received];
    every conversion takes the bound that keeps the budget safe.
    """

    db_now: float
    sent: float
    received: float

    def surely_reached(self, db_time: float) -> float:
        """Local time by which the database clock has certainly reached db_time."""
        return db_time - self.db_now + self.received

    def maybe_reached(self, db_time: float) -> float:
        """Earliest local time at which the database clock may reach db_time."""
        return db_time - self.db_now + self.sent


@dataclasses.dataclass(frozen=True)
class _Slot:
    not_before: float  # local monotonic time
    not_after: float
    probe: bool


@dataclasses.dataclass(order=True)
class _Waiter:
    """A call waiting for a slot: (0 urgent | 1 not, arrival) orders the hand-out."""

    rank: tuple[int, int]
    urgent: bool = dataclasses.field(compare=False)
    slot: asyncio.Future[_Slot] = dataclasses.field(compare=False)


# --- the queries (sql/billing.sql), their rows typed -------------------------------------
# Times are epoch seconds on the database's clock; `now` is that clock when the row was
# read, so a _Clock converts the others to this process's monotonic time. Each query
# selects its dataclass's fields in order: db.row_as builds the row positionally.


@dataclasses.dataclass(frozen=True, slots=True)
class _Shared:
    """The billing_gate row's pause and breaker, as gate_state and the record_* queries
    answer."""

    now: float
    paused_until: float
    probe_until: float | None
    consecutive_failures: int
    breaker_open: bool
    pause_reason: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Claim(_Shared):
    """A claim's answer: `slots` send slots from `first_at` on, or why none (`state`,
    and the slot an urgent claim keeps until `reserved_until`)."""

    state: str
    slots: int
    first_at: float
    reserved_until: float | None


async def _claim_slots(
    conn: db.Conn, *, want: int, urgent: bool, spacing_us: int, lease_us: int, probe_lease_us: int
) -> _Claim | None:
    return await db.fetch_as(
        conn,
        _Claim,
        Q["claim_slots"],
        want=want,
        urgent=urgent,
        spacing_us=spacing_us,
        lease_us=lease_us,
        probe_lease_us=probe_lease_us,
    )


async def _record_throttle(conn: db.Conn, *, pause_us: int) -> _Shared | None:
    return await db.fetch_as(conn, _Shared, Q["record_throttle"], pause_us=pause_us)


async def _record_failure(
    conn: db.Conn, *, threshold: int, cooloff_us: int, probe: bool
) -> _Shared | None:
    return await db.fetch_as(
        conn, _Shared, Q["record_failure"], threshold=threshold, cooloff_us=cooloff_us, probe=probe
    )


async def _record_answer(conn: db.Conn) -> _Shared | None:
    """None when there was nothing to reset (no failure counted, breaker closed)."""
    return await db.fetch_as(conn, _Shared, Q["record_answer"])


async def _gate_state(conn: db.Conn) -> _Shared | None:
    return await db.fetch_as(conn, _Shared, Q["gate_state"])


# --- the gate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GateState:
    """The shared pause and breaker as one process last saw them."""

    paused_until: float  # local monotonic time; -inf when none
    breaker_open: bool
    consecutive_failures: int
    pause_reason: str | None


class SharedGate:
    """The global budget, shared back-off and breaker: one per process."""

    def __init__(
        self,
        pool: db.Pool,
        *,
        rps: float,
        breaker_failures: int,
        breaker_cooloff_seconds: float,
        probe_lease_seconds: float,
    ) -> None:
        self._pool = pool
        self.rps = rps
        self.spacing_us = spacing_us(rps)
        self._max_batch = max(1, math.ceil(LEASE_SECONDS * 1_000_000 / self.spacing_us))
        self._breaker_failures = breaker_failures
        self._cooloff_us = round(breaker_cooloff_seconds * 1_000_000)
        self._probe_lease_us = round(probe_lease_seconds * 1_000_000)
        self._slots: collections.deque[_Slot] = collections.deque()
        # The calls waiting for a slot, urgent ones first, then first come first
        # served; one claim at a time serves them all (and claims ahead what the
        # next lease will use, judged by the hand-outs of the last RATE_WINDOW).
        self._waiters: list[_Waiter] = []
        self._arrivals = itertools.count()
        self._claimer: asyncio.Task[None] | None = None
        self._handed: collections.deque[float] = collections.deque()
        # Set when an urgent call starts waiting: a claim asleep until the next free
        # slot wakes and claims at once as urgent, reserving that slot for it.
        self._urgent_arrived = asyncio.Event()
        self.state = GateState(-math.inf, False, 0, None)
        observability.BILLING_BUDGET_RPS.set(rps)

    # --- before a call ----------------------------------------------------------------

    async def acquire(self, *, urgent: bool = False) -> Permit:
        """Wait for a send slot (an urgent call is served before any that is not)."""
        loop = asyncio.get_running_loop()
        while True:
            self._raise_if_paused(loop.time())
            slot = await self._slot(loop, urgent)
            delay = slot.not_before - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() >= slot.not_after:
                # This event loop was too busy to send in time: the slot is
                # gone, never used late.
                observability.BILLING_SLOTS_DROPPED.inc()
                continue
            self._raise_if_paused(loop.time())
            return Permit(probe=slot.probe)

    async def _slot(self, loop: asyncio.AbstractEventLoop, urgent: bool) -> _Slot:
        """This call's slot, handed out in priority order from the process's claims."""
        waiter = _Waiter((0 if urgent else 1, next(self._arrivals)), urgent, loop.create_future())
        heapq.heappush(self._waiters, waiter)
        if urgent:
            self._urgent_arrived.set()
        try:
            while True:
                self._hand_out(loop.time())
                if waiter.slot.done():
                    return waiter.slot.result()
                claimer = self._claimer
                if claimer is None or claimer.done():
                    claimer = self._claimer = loop.create_task(self._claim(loop))
                    # Its failure is raised by the waiters; none may be left to hear it.
                    claimer.add_done_callback(_heard)
                await asyncio.wait((waiter.slot, claimer), return_when=asyncio.FIRST_COMPLETED)
                if claimer.done() and not waiter.slot.done() and not claimer.cancelled():
                    failed = claimer.exception()
                    if failed is not None:
                        # A pause, or the database: every waiting call hears it.
                        self._raise_if_paused(loop.time())
                        raise failed.with_traceback(None)
        finally:
            if not waiter.slot.done():
                waiter.slot.cancel()  # _hand_out passes over it

    def _hand_out(self, now: float) -> None:
        """Give the slots held to the waiting calls, the most urgent the earliest."""
        while self._slots and self._slots[0].not_after <= now:
            self._slots.popleft()
            observability.BILLING_SLOTS_DROPPED.inc()
        while self._slots and self._waiters:
            waiter = heapq.heappop(self._waiters)
            if waiter.slot.done():
                continue  # its call was cancelled
            waiter.slot.set_result(self._slots.popleft())
            self._handed.append(now)

    def _wanted(self, now: float) -> tuple[int, bool]:
        """How many slots to claim (the waiting calls not yet served, plus what the
        next lease will use at the rate of the last RATE_WINDOW), and whether one of
        the waiting calls is urgent."""
        waiting = [w for w in self._waiters if not w.slot.done()]
        while self._handed and self._handed[0] < now - RATE_WINDOW_SECONDS:
            self._handed.popleft()
        need = len(waiting) - len(self._slots)
        if need <= 0:
            return 0, False
        ahead = math.ceil(len(self._handed) * LEASE_SECONDS / RATE_WINDOW_SECONDS)
        return min(self._max_batch, need + ahead), any(w.urgent for w in waiting)

    def _raise_if_paused(self, now: float) -> None:
        remaining = self.state.paused_until - now
        if remaining > 0:
            reason = self.state.pause_reason or "paused"
            raise Paused(
                f"calls to Billing are paused ({reason}) for {remaining:.1f}s more",
                retry_after=remaining,
            )

    async def _claim(self, loop: asyncio.AbstractEventLoop) -> None:
        """Claim slots for the waiting calls, waiting until some are within the lease."""
        while True:
            # Cleared before the waiters are counted: an urgent call arriving after
            # this (even during the claim's round trip) cuts the wait below short.
            self._urgent_arrived.clear()
            want, urgent = self._wanted(loop.time())
            if want == 0:
                return
            async with self._pool.connection() as conn:
                sent = loop.time()
                row = await _claim_slots(
                    conn,
                    want=want,
                    urgent=urgent,
                    spacing_us=self.spacing_us,
                    lease_us=round(LEASE_SECONDS * 1_000_000),
                    probe_lease_us=self._probe_lease_us,
                )
                received = loop.time()
            if row is None:
                raise RuntimeError("the billing_gate row is missing: run `fleet-payouts migrate`")
            observability.BILLING_CLAIMS.inc()
            clock = _Clock(row.now, sent, received)
            state = row.state
            if state == "probing":
                # Another host's probe decides; look again soon.
                if row.probe_until is None:  # the claim says 'probing' only while it is set
                    raise InvariantError("a probe is out until probe_until")
                recheck = min(row.probe_until, row.now + PROBE_RECHECK_SECONDS)
                self._learn(row, clock, paused_until=recheck)
            else:
                self._learn(row, clock)
            self._raise_if_paused(loop.time())
            slots = row.slots
            if slots:
                spacing = self.spacing_us / 1_000_000
                for i in range(slots):
                    at = row.first_at + i * spacing
                    self._slots.append(
                        _Slot(
                            not_before=clock.surely_reached(at),
                            not_after=clock.maybe_reached(at + SEND_WINDOW_SECONDS),
                            probe=state == "probe",
                        )
                    )
                if state == "probe":
                    logger.info("billing breaker: cool-off over, sending one probe call")
                self._hand_out(loop.time())
                return
            # Every slot within the lease is taken (or kept for another host's
            # urgent call): come back when the next free one is about to enter it.
            free_at = row.first_at
            reserved = row.reserved_until
            if reserved is not None and not urgent and reserved >= free_at:
                # Kept for an urgent call: come back when it has lapsed (sooner
                # if this process gets an urgent call of its own).
                free_at = reserved + LEASE_SECONDS
            wake = clock.maybe_reached(free_at - LEASE_SECONDS)
            if urgent:
                await asyncio.sleep(max(0.0, wake - loop.time()))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent_arrived.wait(), max(0.0, wake - loop.time()))

    # --- after a call -----------------------------------------------------------------

    async def report(
        self, permit: Permit, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Feed the shared breaker and back-off; the call's own result stands either way."""
        if outcome == "answered" and not (
            permit.probe or self.state.breaker_open or self.state.consecutive_failures
        ):
            return  # the common case costs the database nothing
        loop = asyncio.get_running_loop()
        try:
            async with self._pool.connection() as conn:
                sent = loop.time()
                if outcome == "throttled":
                    seconds = pause_seconds(retry_after)
                    row = await _record_throttle(conn, pause_us=round(seconds * 1_000_000))
                    logger.warning("Billing answered 429: every host pauses %.1fs", seconds)
                elif outcome == "failed":
                    row = await _record_failure(
                        conn,
                        threshold=self._breaker_failures,
                        cooloff_us=self._cooloff_us,
                        probe=permit.probe,
                    )
                else:
                    row = await _record_answer(conn)
                received = loop.time()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            # The call's result matters more than the bookkeeping: the next
            # claim reads the shared state again anyway.
            logger.warning("could not record a Billing call's outcome (%s): %s", outcome, exc)
            return
        if row is None:  # record_answer found nothing to reset
            self.state = dataclasses.replace(self.state, breaker_open=False, consecutive_failures=0)
            return
        was_open = self.state.breaker_open
        self._learn(row, _Clock(row.now, sent, received))
        if self.state.breaker_open and not was_open:
            logger.warning(
                "billing breaker open after %s transient failures in a row: "
                "calls paused for a cool-off, then one probe",
                row.consecutive_failures,
            )
        elif was_open and not self.state.breaker_open:
            logger.info("billing breaker closed: Billing answered")

    # --- for the gauge ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the shared state, so the gauge is right on hosts that are not calling."""
        loop = asyncio.get_running_loop()
        async with self._pool.connection() as conn:
            sent = loop.time()
            row = await _gate_state(conn)
            received = loop.time()
        if row is not None:
            self._learn(row, _Clock(row.now, sent, received))

    def paused(self, now: float | None = None) -> bool:
        """Calls are paused: a pause in force, or the breaker open (awaiting its probe)."""
        if now is None:
            now = asyncio.get_running_loop().time()
        return self.state.breaker_open or self.state.paused_until > now

    def _learn(self, row: _Shared, clock: _Clock, *, paused_until: float | None = None) -> None:
        until = row.paused_until if paused_until is None else paused_until
        self.state = GateState(
            paused_until=clock.surely_reached(until),
            breaker_open=row.breaker_open,
            consecutive_failures=row.consecutive_failures,
            pause_reason=row.pause_reason if paused_until is None else "breaker probe out",
        )
        observability.BILLING_PAUSED.set(1 if self.paused(clock.received) else 0)


def _heard(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def from_settings(pool: db.Pool, settings: Settings) -> SharedGate:
    """The process's gate, as configured."""
    return SharedGate(
        pool,
        rps=settings.billing_rps,
        breaker_failures=settings.billing_breaker_failures,
        breaker_cooloff_seconds=settings.billing_breaker_cooloff_seconds,
        # A probe that has not come back within one Billing timeout never will:
        # let another host probe after that.
        probe_lease_seconds=settings.billing_timeout_seconds + 1.0,
    )


def client(pool: db.Pool, settings: Settings) -> BillingClient:
    """The process's Billing client, every call through its shared gate."""
    return BillingClient(
        settings.billing_url,
        token=settings.billing_token.reveal() if settings.billing_token else None,
        timeout=settings.billing_timeout_seconds,
        budget=from_settings(pool, settings),
    )
