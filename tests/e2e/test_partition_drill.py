"""The partition drill: three hosts (serve + worker each), each reaching PostgreSQL and Billing
through links of its own (tests/helpers/faultproxy.py) that a seeded storm hangs, resets,
slows, makes lossy and stalls one way at random moments and in combination, while presses
keep coming through the hosts that can reach PostgreSQL and periodic payouts run every few
seconds. It also cuts a host from PostgreSQL just after its order left for Billing, or just
after it took a lease (the periodic scan's, a webhook round's, the Billing gate's probe),
and heals the cut after the lease ran out; restarts PostgreSQL while a host is cut off; and
restarts a host with its clock skewed (libfaketime).

At the end the books must agree (tests/helpers/drill.py checks them), every payout must be
final within DRAIN_BOUND_S of the last heal, the events feed must be complete and ordered,
and no two hosts may have held one lease at once or acted on one they did not hold.

Short by default (a STORM_S storm, for the suite); `DRILL_SECONDS=600` (`make drill`) storms
that long. `DRILL_SEED` replays a run's faults (their kinds, hosts, durations and order;
not their timing relative to the service, which the machine's load decides). A failing run
keeps every log under KEEP_DIR.

The lease log: the drill adds a table and triggers to its own database (not a migration; the
service knows nothing of them) that record, with the database's clock and the session's
client port, every take, renewal and release of `scan_leases`, of `webhook_state`'s lease and
of `billing_gate`'s probe, and every act done under one (a periodic payout inserted by
the scan, a webhook cursor or park mark written). Each link records the local ports of its upstream
connections, which tells the host of every entry.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fleet_payouts_devkit.processes import free_port
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from service.ops import roles
from tests.conftest import service_env
from tests.helpers.api import register, set_faults, stats
from tests.helpers.drill import (
    FINISHED,
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
    in_flight_report,
    private_database,
    read_feed,
    seed_parks,
)
from tests.helpers.faultproxy import DOWN, UP, FaultNet, Link, fault_net
from tests.helpers.leaselog import LEASE_LOG, HostOf, lease_findings
from tests.helpers.procs import wait_for

DRILL_SECONDS = float(os.environ.get("DRILL_SECONDS") or 0)
SEED = int(os.environ.get("DRILL_SEED") or random.SystemRandom().randrange(2**31))
STORM_S = 15.0  # the suite's short round: at least this, and until every kind was injected
PLAN_GRACE_S = 30.0  # how long past its time a storm goes on to inject every kind once
KEEP_DIR = Path(os.environ.get("DRILL_KEEP_DIR") or tempfile.gettempdir())

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DRILL_SECONDS + 300)]

HOSTS = 3
INSTANT_PARKS = [f"part-i{i:02d}" for i in range(30)]
PERIODIC_PARKS = [f"part-p{i:02d}" for i in range(6)]
PERIOD = timedelta(seconds=3)
STALLED_JOB_SECONDS = 5  # the scan lease's length: cuts longer than this outlive it
GATE_PROBE_S = 2.0  # BILLING_TIMEOUT_SECONDS (1) + 1: the probe's lease
WEBHOOK_LEASE_S = 45.0  # service.events.webhooks.LEASE_SECONDS with its defaults
# Every payout is final this long after the last fault healed (the runbook's bound for the
# drill's settings: STALLED_JOB_SECONDS=5, RETRY_BACKOFF_CAP_SECONDS=1, breaker cool-off 1 s).
DRAIN_BOUND_S = 60.0
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
TICK_S = 0.05  # the storm's clock: how often it looks at its episodes and the lease log
WEBHOOK_SECRET = "drill-webhook-secret-0123456789"


# --- the hosts and their links -------------------------------------------------------------


@dataclass
class Wired:
    """A host and its two links."""

    host: Host
    pg: Link
    billing: Link
    skew_s: int = 0

    @property
    def name(self) -> str:
        return self.host.name

    def heal(self) -> None:
        self.pg.heal()
        self.billing.heal()


class Receiver:
    """Where the webhooks go: answers 204 to every delivery and counts them."""

    def __init__(self) -> None:
        self.deliveries = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.deliveries += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the storm -----------------------------------------------------------------------------


@dataclass
class Episode:
    """One fault on one host, healed at `heal_at` (monotonic), or once `fired` plus `hold`."""

    kind: str
    wired: Wired
    heal: Callable[[], None]
    heal_at: float | None
    hold: float = 0.0
    fired: threading.Event = field(default_factory=threading.Event)
    expires: float = 0.0  # an armed episode that never fired is disarmed then


class Storm:
    """Faults at random moments, in combination, from one seeded generator; always at least
    one host untouched so the presses have somewhere to go."""

    KINDS = (
        "pg-hang",
        "pg-reset",
        "pg-cut-after-order",
        "billing-cut-after-order",
        "pg-cut-after-scan-lease",
        "pg-cut-after-webhook-lease",
        "pg-cut-gate-probe",
        "billing-hang",
        "billing-reset",
        "slow",
        "loss",
        "stall-one-way",
        "clock-skew",
        "pg-restart-in-partition",
    )

    def __init__(
        self,
        rng: random.Random,
        net: FaultNet,
        wired: list[Wired],
        db: Database,
        sup: Supervisor,
        url: str,
        billing: str,
        log: Path,
    ) -> None:
        self.rng = rng
        self.net = net
        self.wired = wired
        self.db = db
        self.sup = sup
        self.url = url
        self.billing = billing
        self.log = log.open("w")
        self.began = time.monotonic()
        self.active: list[Episode] = []
        self.injected: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.last_heal = time.monotonic()
        self.faketime = LIBFAKETIME.exists()
        self.long_webhook_cut_done = False
        self.host_of = port_map(wired)

    def note(self, text: str) -> None:
        self.log.write(f"{time.monotonic() - self.began:8.2f} {text}\n")
        self.log.flush()

    def reachable(self) -> list[Host]:
        """The hosts a load balancer would send presses to: those whose PostgreSQL link is
        not cut (slow and lossy links included)."""
        with self.lock:
            cut = {
                e.wired.name
                for e in self.active
                if e.kind.startswith("pg-") and (e.heal_at is not None or e.fired.is_set())
            }
        return [w.host for w in self.wired if w.name not in cut]

    def run(self, seconds: float) -> None:
        """Every kind once first (in a seeded order), then kinds at random, until `seconds`
        have passed and every kind was injected; then heal everything."""
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        plan = list(self.KINDS)
        self.rng.shuffle(plan)
        while time.monotonic() < end or (plan and time.monotonic() < end + PLAN_GRACE_S):
            self.tick()
            if time.monotonic() >= next_at:
                kind = plan[0] if plan else self.rng.choice(self.KINDS)
                if self.inject(kind):
                    plan = plan[1:]
                    next_at = time.monotonic() + self.rng.uniform(0.2, 1.5)
            time.sleep(TICK_S)  # the storm's clock, not synchronisation
        self.heal_all()

    def tick(self) -> None:
        now = time.monotonic()
        for e in list(self.active):
            if e.heal_at is None and e.fired.is_set():
                e.heal_at = now + e.hold
                self.note(f"{e.wired.name} {e.kind}: fired, cut for {e.hold:.1f} s")
            if e.heal_at is None and now > e.expires:
                e.wired.pg.disarm()
                e.wired.billing.disarm()
                self.finish(e, "never fired")
            elif e.heal_at is not None and now >= e.heal_at:
                self.finish(e, "healed")

    def finish(self, e: Episode, how: str) -> None:
        e.heal()
        with self.lock:
            self.active.remove(e)
        self.last_heal = time.monotonic()
        self.note(f"{e.wired.name} {e.kind}: {how}")

    def heal_all(self) -> None:
        for e in list(self.active):
            e.wired.pg.disarm()
            e.wired.billing.disarm()
            self.finish(e, "healed at the storm's end")
        set_faults(self.billing, error_rate=0)

    def inject(self, kind: str) -> bool:
        """Start a fault of this kind on a random host; False when every host but one is
        busy with a fault already (one host stays whole)."""
        busy = {e.wired.name for e in self.active}
        free = [w for w in self.wired if w.name not in busy]
        if len(free) <= 1:
            return False
        w = self.rng.choice(free)
        hold = self.rng.uniform(1.0, 4.0)
        episode = getattr(self, "_" + kind.replace("-", "_"))(w, hold)
        if episode is None:
            self.skipped[kind] += 1
            return True
        self.injected[kind] += 1
        with self.lock:
            self.active.append(episode)
        lasts = (
            "armed" if episode.heal_at is None else f"{episode.heal_at - time.monotonic():.1f} s"
        )
        self.note(f"{episode.wired.name} {kind}: {lasts}")
        return True

    def timed(self, kind: str, w: Wired, hold: float, heal: Callable[[], None]) -> Episode:
        return Episode(kind, w, heal, time.monotonic() + hold)

    def armed(
        self, kind: str, w: Wired, hold: float, link: Link, pattern: bytes, cut: Link | None = None
    ) -> Episode:
        """Hang `cut` (`w`'s PostgreSQL link by default) just after `pattern` went up `link`,
        for `hold` seconds."""
        cut = cut or w.pg
        e = Episode(kind, w, cut.heal, None, hold, expires=time.monotonic() + 10)

        def fire() -> None:
            # The host hears nothing from now on; what it sent still reaches the server (the
            # take commits, the order is applied) before the link hangs both ways: the host
            # holds it on the other side's books and does not know.
            cut._stall(DOWN)
            self.net.loop.call_later(0.05, cut._hang)
            e.fired.set()

        link.on_up(pattern, fire)
        return e

    # The kinds, one method each: the episode, or None when it cannot be injected now.

    def _pg_hang(self, w: Wired, hold: float) -> Episode:
        w.pg.hang()
        return self.timed("pg-hang", w, hold, w.pg.heal)

    def _pg_reset(self, w: Wired, hold: float) -> Episode:
        w.pg.reset()
        return self.timed("pg-reset", w, hold, w.pg.heal)

    def _pg_cut_after_order(self, w: Wired, hold: float) -> Episode:
        return self.armed("pg-cut-after-order", w, hold, w.billing, b"POST /v1/payouts ")

    def _billing_cut_after_order(self, w: Wired, hold: float) -> Episode:
        # The order reaches Billing, its answer is lost: the outcome is unknown to the host.
        kind = "billing-cut-after-order"
        return self.armed(kind, w, hold, w.billing, b"POST /v1/payouts ", cut=w.billing)

    def _pg_cut_after_scan_lease(self, w: Wired, hold: float) -> Episode:
        # Past the lease's end: another host takes the scan before this one hears back.
        hold = STALLED_JOB_SECONDS + self.rng.uniform(1.0, 3.0)
        return self.armed("pg-cut-after-scan-lease", w, hold, w.pg, b"INSERT INTO scan_leases")

    def _pg_cut_after_webhook_lease(self, w: Wired, hold: float) -> Episode:
        # Past the lease's 45 s once in a long drill; within it otherwise.
        if DRILL_SECONDS >= 300 and not self.long_webhook_cut_done:
            self.long_webhook_cut_done = True
            hold = WEBHOOK_LEASE_S + 3.0
        return self.armed("pg-cut-after-webhook-lease", w, hold, w.pg, b"SET lease_holder")

    def _pg_cut_gate_probe(self, w: Wired, hold: float) -> Episode | None:
        """Billing fails every call until the breaker opens; the host whose probe the lease
        log shows first is cut from PostgreSQL past the probe's lease."""
        set_faults(self.billing, error_rate=1.0)
        try:
            taken = self.wait_probe(timeout=8.0)
        finally:
            set_faults(self.billing, error_rate=0)
        prober = next((x for x in self.wired if x.name == taken), None)
        if prober is None or prober.name in {e.wired.name for e in self.active}:
            return None
        if len(self.reachable()) <= 1:
            return None
        prober.pg.hang()
        return self.timed(
            "pg-cut-gate-probe", prober, GATE_PROBE_S + self.rng.uniform(1, 3), prober.pg.heal
        )

    def wait_probe(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
            (start,) = conn.execute(
                "SELECT coalesce(max(n), 0) FROM drill_lease_log"
            ).fetchone() or (0,)
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT port, at FROM drill_lease_log WHERE lease = 'gate_probe'"
                    " AND event = 'take' AND n > %s ORDER BY n LIMIT 1",
                    (start,),
                ).fetchone()
                if row is not None:
                    return self.host_of(row[0], row[1])
                time.sleep(TICK_S)  # polling the log, bounded by the deadline
        return None

    def _billing_hang(self, w: Wired, hold: float) -> Episode:
        w.billing.hang()
        return self.timed("billing-hang", w, hold, w.billing.heal)

    def _billing_reset(self, w: Wired, hold: float) -> Episode:
        w.billing.reset()
        return self.timed("billing-reset", w, hold, w.billing.heal)

    def _slow(self, w: Wired, hold: float) -> Episode:
        delay = self.rng.uniform(0.2, 2.0)
        for link in (w.pg, w.billing):
            link.delay(delay)
        return self.timed("slow", w, hold, w.heal)

    def _loss(self, w: Wired, hold: float) -> Episode:
        share, stall = self.rng.uniform(0.05, 0.2), self.rng.uniform(0.2, 1.0)
        for link in (w.pg, w.billing):
            link.loss(share, stall)
        return self.timed("loss", w, hold, w.heal)

    def _stall_one_way(self, w: Wired, hold: float) -> Episode:
        link = self.rng.choice((w.pg, w.billing))
        link.stall(self.rng.choice((UP, DOWN)))
        return self.timed("stall-one-way", w, hold, link.heal)

    def _clock_skew(self, w: Wired, hold: float) -> Episode | None:
        if not self.faketime:
            return None
        skew = self.rng.choice((-1, 1)) * self.rng.randint(5, 600)
        self.set_skew(w, skew)
        return self.timed("clock-skew", w, hold, lambda: self.set_skew(w, 0))

    def set_skew(self, w: Wired, skew: int) -> None:
        """Restart the host's processes with their clocks `skew` seconds off (SIGKILL, as a
        host rebooting with a bad clock)."""
        w.skew_s = skew
        w.host.extra_env = (
            {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{skew:+d}s"} if skew else {}
        )
        self.sup.restart(w.host)
        self.note(f"{w.name} restarted, clock {skew:+d} s")

    def _pg_restart_in_partition(self, w: Wired, hold: float) -> Episode:
        w.pg.hang()
        self.note(f"{w.name} cut from PostgreSQL; restarting PostgreSQL")
        began = time.monotonic()
        self.db.restart_fast()
        self.note(f"PostgreSQL restarted in {time.monotonic() - began:.1f} s")
        return self.timed("pg-restart-in-partition", w, self.rng.uniform(1.0, 4.0), w.pg.heal)


def port_map(wired: list[Wired]) -> HostOf:
    """The host whose PostgreSQL link had a connection open from this local port at that
    moment (None when none had, or several: ports are reused over a long run)."""

    def host_of(port: int | None, at: datetime) -> str | None:
        if port is None:
            return None
        found = [w.name for w in wired if w.pg.had_port(port, at.timestamp())]
        return found[0] if len(found) == 1 else None

    return host_of


@contextlib.contextmanager
def kept_logs(tmp: Path, db: Database) -> Iterator[None]:
    """PostgreSQL's log joins the processes' logs and the storm's timeline in `tmp`; on a
    failure all of them are copied to KEEP_DIR, and the way to replay the run is printed."""
    try:
        yield
    except BaseException:
        kept = KEEP_DIR / f"fp-partition-drill-{SEED}-{int(time.time())}"
        shutil.copytree(tmp, kept, dirs_exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(db.server.data_dir / "server.log", kept / "postgresql.log")
        print(
            f"\npartition drill FAILED; replay: DRILL_SEED={SEED} DRILL_SECONDS={DRILL_SECONDS:g}"
            f"; logs kept in {kept}"
        )
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(db.server.data_dir / "server.log", tmp / "postgresql.log")


def test_partition_drill_three_hosts_cut_off_at_random_lose_double_and_overlap_nothing(
    billing_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through a seeded storm of hung, reset, slow, lossy and one-way links between each host
    and PostgreSQL or Billing (cuts after an order, after a lease taken, across a PostgreSQL
    restart) and skewed clocks, every payout is final within DRAIN_BOUND_S of the last heal,
    Billing holds one transfer per succeeded payout with its amount and nothing else, every
    accepted press is a payout, periodic payouts keep their period, the events feed is whole
    and ordered, the audit log verifies, no lease was held by two hosts at once nor acted on
    by a host without it, and nothing answered 500."""
    began = time.monotonic()
    rng = random.Random(SEED)
    with (
        private_database() as (db, url),
        kept_logs(tmp_path, db),
        fault_net(SEED) as net,
        Receiver() as receiver,
    ):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(LEASE_LOG)
        pg_port_text = conninfo_to_dict(url)["port"]
        assert pg_port_text is not None
        pg_port = int(pg_port_text)
        billing_port = httpx.URL(billing_url).port
        assert billing_port is not None
        wired: list[Wired] = []
        for i in range(HOSTS):
            pg_link = net.link(f"host{i}-pg", pg_port)
            billing_link = net.link(f"host{i}-billing", billing_port)
            env = service_env(
                f"postgresql://{roles.ROLES.app}@127.0.0.1:{pg_link.port}/fleet_drill",
                f"http://127.0.0.1:{billing_link.port}",
                PAYOUT_PERIOD_DAYS=str(PERIOD.total_seconds() / 86400),
                PERIODIC_SCAN_CRON="* * * * * */1",
                INSTANT_PAYOUT_COOLDOWN_HOURS=str(1 / 3600),
                API_DRAIN_SECONDS="0",
                SHUTDOWN_GRACE_SECONDS="5",
                STALLED_JOB_SECONDS=str(STALLED_JOB_SECONDS),
                WEBHOOK_URL=receiver.url,
                WEBHOOK_SECRET=WEBHOOK_SECRET,
            )
            wired.append(Wired(Host(i, env, tmp_path), pg_link, billing_link))
        hosts = [w.host for w in wired]
        sup = Supervisor(hosts)
        storm = Storm(rng, net, wired, db, sup, url, billing_url, tmp_path / "storm.log")
        load = Load(hosts, INSTANT_PARKS, storm.reachable)
        tail = FeedTail(storm.reachable)
        try:
            sup.start()
            all_ready(hosts)
            seed_parks(hosts[0].url, billing_url, INSTANT_PARKS, PERIODIC_PARKS)
            load.start()
            tail.start()
            wait_for(
                lambda: count(url, FINISHED) >= 3,
                timeout=RECOVERY_TIMEOUT_S,
                interval=0.2,
                what="the first payouts to be final",
            )
            storm.run(max(DRILL_SECONDS - (time.monotonic() - began), STORM_S))

            load.stop()
            all_ready(hosts)  # the storm's end may have just restarted a host (its clock)
            for park in PERIODIC_PARKS:
                register(hosts[0].url, park, instant=None, periodic=False)
            try:
                wait_for(
                    lambda: count(url, IN_FLIGHT) == 0,
                    timeout=DRAIN_BOUND_S - (time.monotonic() - storm.last_heal),
                    interval=0.2,
                    what=f"every payout final within {DRAIN_BOUND_S} s of the last heal",
                )
            except AssertionError:
                print(f"--- in flight ---\n{in_flight_report(url)}")
                raise
            drained = time.monotonic() - storm.last_heal
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
            storm.heal_all()
            storm.log.close()

        verdict = check_books(url, billing_url, load, PERIODIC_PARKS, PERIOD)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as pg:
            log = pg.execute("SELECT * FROM drill_lease_log ORDER BY n").fetchall()
        with (tmp_path / "lease_log.txt").open("w") as out:
            out.writelines(f"{dict(entry)}\n" for entry in log)
        leases = lease_findings(log, storm.host_of)
        answers = collections.Counter(a for p in load.presses for a in p.answers)
        accepted = sum(1 for p in load.presses if p.payout_id is not None)
        with capsys.disabled():
            print(
                f"\npartition drill: seed {SEED}, {time.monotonic() - began:.0f} s"
                f"\n  faults injected: {dict(sorted(storm.injected.items()))};"
                f" not injectable then: {dict(storm.skipped)}"
                f"{'' if storm.faketime else ' (no libfaketime: clock skew skipped)'}"
                f"\n  presses: {len(load.presses)} ({accepted} accepted); answers"
                f" {dict(sorted(answers.items()))}; {load.transport_errors} connection errors"
                f" retried; feed reader answered {dict(tail.answers)}"
                f"\n  payouts by (kind, status): {dict(sorted(verdict.by_status.items()))}"
                f"\n  longest in flight {verdict.longest_in_flight}; all final {drained:.1f} s"
                f" after the last heal (bound {DRAIN_BOUND_S:.0f} s)"
                f"\n  Billing transfers {verdict.transfers}; requests {stats(billing_url)}"
                f"\n  leases: takes {leases.takes}, acts {leases.acts}, overlapping"
                f" {len(leases.overlaps)}, acts without the lease {len(leases.outside)},"
                f" entries of no known host {leases.unattributed};"
                f" webhooks delivered {receiver.deliveries}"
                f"\n  events {len(feed)}; supervisor restarts {dict(sup.restarts)};"
                f" PostgreSQL restarted {db.restarts}"
                f"\n  logs: {tmp_path} (storm.log: the timeline)"
            )
        assert [] == tail.server_errors, "the feed answered 5xx other than 503"
        assert [] == feed_problems(feed, verdict.payouts)
        assert [e["id"] for e in feed] == [e["id"] for e in tail.events], "the storm's reader"
        assert [] == leases.overlaps, "a lease held by two hosts at once"
        assert [] == leases.outside, "acts by a host that did not hold the lease"
        assert 0 < sum(storm.injected.values())
