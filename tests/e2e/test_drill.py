"""The drill: three hosts under a supervisor, a host SIGKILLed, PostgreSQL restarted fast and
crashed, Billing faults on and off, while a load generator presses "Pay out now" and periodic
payouts run every few seconds. At the end the books must agree: nothing lost, nothing doubled.

Short by default (one round of trouble, about a minute); `DRILL_SECONDS=600` (or `make drill`)
repeats the rounds for that long. The drill runs on a PostgreSQL of its own, since it restarts
and crashes it: the suite's shared server must not notice. fsync is off there as in the rest of
the suite; `pg_ctl stop -m immediate` kills processes, not the machine, so the kernel keeps
every write and crash recovery is real.
"""

from __future__ import annotations

import collections
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from service.ops import roles
from tests.conftest import service_env, with_user
from tests.helpers.api import register, set_faults, stats
from tests.helpers.drill import (
    IN_FLIGHT,
    RECOVERY_TIMEOUT_S,
    Database,
    FeedTail,
    Host,
    Load,
    Supervisor,
    all_ready,
    check_books,
    count,
    feed_problems,
    private_database,
    progress,
    read_feed,
    seed_parks,
)
from tests.helpers.emulator import billing_requests
from tests.helpers.procs import wait_for

DRILL_SECONDS = float(os.environ.get("DRILL_SECONDS") or 0)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DRILL_SECONDS + 300)]

HOSTS = 3
INSTANT_PARKS = [f"drill-i{i:02d}" for i in range(40)]
PERIODIC_PARKS = [f"drill-p{i:02d}" for i in range(8)]
PERIOD = timedelta(seconds=3)
# Enough for ~1,000 payouts of PAYOUT_MAX_AMOUNT each: no park runs dry during a drill.
FAULTS_ON = {
    "error_rate": 0.1,
    "timeout_rate": 0.05,
    "timeout_hang_ms": 1500,  # past BILLING_TIMEOUT_SECONDS=1: the answer is lost
    "apply_then_fail_rate": 0.2,
    "throttle_rate": 0.05,
    "retry_after_s": 1,
}
FAULTS_OFF = {"error_rate": 0, "timeout_rate": 0, "apply_then_fail_rate": 0, "throttle_rate": 0}


# --- the drill -----------------------------------------------------------------------------


def one_round(
    round_no: int, url: str, billing: str, db: Database, sup: Supervisor, load: Load
) -> None:
    """One round of trouble: faults on, a host killed and back, PostgreSQL restarted fast,
    faults off and on, PostgreSQL crashed and back, faults off."""
    hosts = sup.hosts
    set_faults(billing, **FAULTS_ON)
    victim = hosts[round_no % len(hosts)]
    sup.kill_host(victim)
    progress(url, f"SIGKILL of {victim.name}")
    sup.revive(victim)
    all_ready([victim])

    db.restart_fast()
    progress(url, "pg_ctl restart -m fast")

    set_faults(billing, **FAULTS_OFF)
    progress(url, "Billing faults off")
    set_faults(billing, **FAULTS_ON)

    refused = load.count(503)
    db.crash()
    # Held down until callers have felt it: presses answered 503 (and retried).
    wait_for(
        lambda: load.count(503) >= refused + 3,
        timeout=RECOVERY_TIMEOUT_S,
        interval=0.1,
        what="presses to be answered 503 while PostgreSQL is down",
    )
    db.start_after_crash()
    progress(url, "PostgreSQL's crash and recovery")
    set_faults(billing, **FAULTS_OFF)


def test_drill_three_hosts_through_crashes_and_faults_lose_and_double_nothing(
    billing_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through a SIGKILLed host, PostgreSQL restarted and crashed and Billing faults, every
    payout ends final, Billing holds exactly one transfer per succeeded payout with its amount,
    every accepted press is a payout, periodic payouts keep their period, the events feed holds
    each payout's creation and final status once and in order (as read during the storm too),
    the audit log verifies, and no request is ever answered 500."""
    began = time.monotonic()
    with private_database() as (db, url):
        env = service_env(
            with_user(url, roles.ROLES.app),
            billing_url,
            PAYOUT_PERIOD_DAYS=str(PERIOD.total_seconds() / 86400),
            PERIODIC_SCAN_CRON="* * * * * */1",
            INSTANT_PAYOUT_COOLDOWN_HOURS=str(1 / 3600),
            API_DRAIN_SECONDS="0",
            SHUTDOWN_GRACE_SECONDS="5",
        )
        hosts = [Host(i, env, tmp_path) for i in range(HOSTS)]
        sup = Supervisor(hosts)
        load = Load(hosts, INSTANT_PARKS)
        tail = FeedTail(lambda: hosts)
        try:
            sup.start()
            all_ready(hosts)
            seed_parks(hosts[0].url, billing_url, INSTANT_PARKS, PERIODIC_PARKS)
            load.start()
            tail.start()
            progress(url, "the start")

            round_no = 0
            while True:
                one_round(round_no, url, billing_url, db, sup, load)
                round_no += 1
                if time.monotonic() - began >= DRILL_SECONDS:
                    break

            load.stop()
            # Periodic payouts would go on forever: switch them off, then let the rest finish.
            for park in PERIODIC_PARKS:
                register(hosts[0].url, park, instant=None, periodic=False)
            wait_for(
                lambda: count(url, IN_FLIGHT) == 0,
                timeout=RECOVERY_TIMEOUT_S,
                interval=0.2,
                what="every payout to reach a final status",
            )
            tail.stop()
            tail.catch_up(hosts[0].url)
            feed = read_feed(hosts[0].url)
        except BaseException:
            print(sup.logs())
            print(f"--- PostgreSQL ---\n{db.log_tail()}")
            raise
        finally:
            load.stop()
            tail.stop()
            sup.stop()
            set_faults(billing_url, **FAULTS_OFF)

        verdict = check_books(url, billing_url, load, PERIODIC_PARKS, PERIOD)
        answers = collections.Counter(a for p in load.presses for a in p.answers)
        billing_said = collections.Counter(r["status"] for r in billing_requests(billing_url))
        refusals = collections.Counter(p.code for p in load.presses if p.code is not None)
        accepted = sum(1 for p in load.presses if p.payout_id is not None)
        with capsys.disabled():
            print(
                f"\ndrill: {time.monotonic() - began:.0f} s, {round_no} round(s) of trouble"
                f"\n  presses: {len(load.presses)} ({accepted} accepted, refused"
                f" {dict(refusals)}); answers {dict(sorted(answers.items()))};"
                f" {load.transport_errors} connection errors retried"
                f"\n  payouts by (kind, status): {dict(sorted(verdict.by_status.items()))};"
                f" longest in flight {verdict.longest_in_flight}"
                f"\n  events: {len(feed)}; the storm's reader answered {dict(tail.answers)}"
                f"\n  Billing transfers: {verdict.transfers}; Billing requests:"
                f" {stats(billing_url)}, answered {dict(sorted(billing_said.items()))}"
                f"\n  restarts by the supervisor: {dict(sup.restarts)}; PostgreSQL restarted"
                f" {db.restarts}, crashed {db.crashes}; hosts killed {round_no}"
                f"\n  logs: {tmp_path}"
            )
        # The drill met what it claims to: an outage callers felt, periodic payouts, orders
        # applied but answered 500 (the hardest case for the caller).
        assert 0 < answers[503]
        assert 0 < sum(n for (kind, _), n in verdict.by_status.items() if kind == "periodic")
        assert 0 < billing_said[500]
        assert [] == tail.server_errors, "the feed answered 5xx other than 503"
        assert [] == feed_problems(feed, verdict.payouts)
        assert [e["id"] for e in feed] == [e["id"] for e in tail.events], "the storm's reader"
