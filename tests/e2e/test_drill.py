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

import asyncio
import collections
import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from service import migrate, roles
from service.devenv.postgres import EmbeddedPostgres, EmbeddedPostgresError
from service.devenv.processes import free_port
from tests.conftest import service_env, with_dbname, with_user
from tests.helpers.api import (
    FINAL,
    assert_books_agree,
    periodic_payouts,
    press_headers,
    register,
    rows,
    set_balance,
    set_faults,
    spacing_violations,
    stats,
    transfers,
)
from tests.helpers.emulator import billing_requests
from tests.helpers.procs import Proc, wait_for

DRILL_SECONDS = float(os.environ.get("DRILL_SECONDS") or 0)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DRILL_SECONDS + 300)]

HOSTS = 3
INSTANT_PARKS = [f"drill-i{i:02d}" for i in range(40)]
PERIODIC_PARKS = [f"drill-p{i:02d}" for i in range(8)]
PERIOD = timedelta(seconds=3)
# Enough for ~1,000 payouts of PAYOUT_MAX_AMOUNT each: no park runs dry during a drill.
BALANCE = "100000000.00"
PRESSERS = 3
PRESS_PAUSE_S = 0.15  # pacing of each presser between presses, not synchronisation
RETRY_PAUSE_S = 0.2  # pacing of a press's retries (503, connection refused)
PRESS_DEADLINE_S = 90.0  # a press unanswered this long is a failure of its own
RESTART_DELAY_S = 0.5  # the supervisor's RestartSec: no busy loop while the database is down
PROGRESS = 12  # payouts that must reach a final status after each blow before the next
RECOVERY_TIMEOUT_S = 90.0
FAULTS_ON = {
    "error_rate": 0.1,
    "timeout_rate": 0.05,
    "timeout_hang_ms": 1500,  # past BILLING_TIMEOUT_SECONDS=1: the answer is lost
    "apply_then_fail_rate": 0.2,
    "throttle_rate": 0.05,
    "retry_after_s": 1,
}
FAULTS_OFF = {"error_rate": 0, "timeout_rate": 0, "apply_then_fail_rate": 0, "throttle_rate": 0}


# --- the private PostgreSQL ----------------------------------------------------------------


class Database:
    """The drill's own PostgreSQL, which it restarts and crashes."""

    def __init__(self, base: Path) -> None:
        self.server = EmbeddedPostgres(base / "data", port=free_port(), fast_unsafe=True)
        self.restarts = 0
        self.crashes = 0

    def start(self) -> str:
        url = with_dbname(self.server.start(), "fleet_drill")
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet_drill")
        asyncio.run(migrate.migrate(url))
        return url

    def pg_ctl(self, *args: str) -> None:
        # EmbeddedPostgres knows how to run its programs as the server's account (we may be
        # root); reusing that beats a second copy of the runuser dance here.
        data = str(self.server.data_dir)
        log = str(self.server.data_dir / "server.log")
        result = self.server._run(
            [str(self.server.bindir / "pg_ctl"), "-D", data, "-l", log, *args]
        )
        assert 0 == result.returncode, f"pg_ctl {args}: {result.stderr}\n{self.log_tail()}"

    def restart_fast(self) -> None:
        """`pg_ctl restart -m fast`: sessions are ended cleanly, the server is back at once."""
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "restart")
        self.restarts += 1

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend dies without a checkpoint, like a crash."""
        self.pg_ctl("-m", "immediate", "-w", "-t", "60", "stop")
        self.crashes += 1

    def start_after_crash(self) -> None:
        """Start again on the same port; crash recovery replays the WAL."""
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def log_tail(self) -> str:
        return self.server._log_tail()


@contextlib.contextmanager
def private_database() -> Iterator[tuple[Database, str]]:
    """A migrated database on a server of our own; everything removed at the end."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-drill-pg-"))
    base.chmod(0o755)  # the postgres account must reach the data dir when we are root
    try:
        try:
            database = Database(base)
        except EmbeddedPostgresError as exc:
            pytest.skip(f"the drill restarts its own PostgreSQL and cannot start one: {exc}")
        try:
            yield database, database.start()
        finally:
            database.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- three hosts under a supervisor --------------------------------------------------------


class Host:
    """One "host": a `serve` and a `worker`, restarted when they exit unless the host is down."""

    def __init__(self, index: int, env: dict[str, str], log_dir: Path) -> None:
        self.name = f"host{index}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_dir = log_dir
        self.up = True
        self.procs: dict[str, Proc] = {}
        self.started: dict[str, float] = {}
        self.history: list[Proc] = []

    def args(self, role: str) -> list[str]:
        if role == "serve":
            return ["serve", "--port", str(self.port)]
        return ["worker", "--concurrency", "4"]

    def spawn(self, role: str) -> None:
        n = sum(1 for p in self.history if p.args[0] == role)
        proc = Proc(self.args(role), self.env, self.log_dir / f"{self.name}-{role}-{n}.log")
        self.procs[role] = proc
        self.started[role] = time.monotonic()
        self.history.append(proc)

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200


class Supervisor:
    """Restarts every process of an up host that exits, as systemd's Restart=always would."""

    ROLES = ("serve", "worker")

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.lock = threading.Lock()
        self.restarts: collections.Counter[str] = collections.Counter()
        self.exits: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        with self.lock:
            for host in self.hosts:
                for role in self.ROLES:
                    host.spawn(role)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self.lock:
                for host in self.hosts:
                    if host.up:
                        for role in self.ROLES:
                            self._check(host, role)

    def _check(self, host: Host, role: str) -> None:
        proc = host.procs[role]
        if proc.alive():
            return
        if time.monotonic() - host.started[role] < RESTART_DELAY_S:
            return
        self.exits.append(f"{proc.log.name} exited {proc.popen.returncode}")
        self.restarts[role] += 1
        host.spawn(role)

    def kill_host(self, host: Host) -> None:
        """SIGKILL both processes of the host, which stays down until `revive`."""
        with self.lock:
            host.up = False
            for proc in host.procs.values():
                proc.kill()

    def revive(self, host: Host) -> None:
        with self.lock:
            for role in self.ROLES:
                host.spawn(role)
            host.up = True

    def stop(self) -> None:
        """Stop supervising, then stop every process (SIGTERM, SIGKILL after a while)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for host in self.hosts:
            for proc in host.history:
                proc.stop(timeout=15)

    def logs(self) -> str:
        latest = [p for h in self.hosts for p in h.procs.values()]
        tails = "\n".join(f"--- {p.log.name} ---\n{p.tail(30)}" for p in latest)
        return "--- exits ---\n" + "\n".join(self.exits) + f"\n{tails}"


# --- the load generator --------------------------------------------------------------------


@dataclass
class Press:
    """One "Pay out now" press, with every answer it got until a final one."""

    park: str
    key: str
    body: dict[str, str]
    answers: list[int] = field(default_factory=list)
    payout_id: str | None = None
    code: str | None = None


class Load:
    """Presses for random parks through random hosts; each press retried with its own
    Idempotency-Key until it is answered with something other than a 5xx."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.presses: list[Press] = []
        self.server_errors: list[str] = []  # any 5xx other than 503, and every 500
        self.unanswered: list[Press] = []
        self.transport_errors = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"presser-{i}", daemon=True)
            for i in range(PRESSERS)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=PRESS_DEADLINE_S + 15)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(p.answers.count(status) for p in self.presses)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = rng.choice([{}, {"amount": "10.00"}])
                self._press(client, rng, Press(rng.choice(INSTANT_PARKS), uuid.uuid4().hex, body))
                self._stop.wait(PRESS_PAUSE_S)

    def _press(self, client: httpx.Client, rng: random.Random, press: Press) -> None:
        with self.lock:
            self.presses.append(press)
        headers = press_headers(press.park, user=f"user-of-{press.park}", key=press.key)
        deadline = time.monotonic() + PRESS_DEADLINE_S
        while time.monotonic() < deadline:
            host = rng.choice(self.hosts)
            try:
                r = client.post(f"{host.url}/v1/payouts/instant", json=press.body, headers=headers)
            except httpx.TransportError:
                # A host down or killed mid-request: the press may or may not have landed;
                # the same key, sent again, says which.
                with self.lock:
                    self.transport_errors += 1
                time.sleep(RETRY_PAUSE_S)
                continue
            with self.lock:
                press.answers.append(r.status_code)
                if r.status_code >= 500 and r.status_code != 503:
                    self.server_errors.append(f"{r.status_code} from {host.name}: {r.text}")
            if r.status_code >= 500:
                time.sleep(RETRY_PAUSE_S)
                continue
            answer = r.json()
            if r.status_code in (200, 202):
                press.payout_id = answer["id"]
            else:
                press.code = answer.get("code")
            return
        with self.lock:
            self.unanswered.append(press)


# --- the drill -----------------------------------------------------------------------------


IN_FLIGHT = "status IN ('pending', 'processing')"
FINISHED = f"NOT ({IN_FLIGHT})"


def count(url: str, where: str) -> int:
    """Payouts matching `where`, on a fresh connection: the server may have restarted since."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        return int(rows(conn, f"SELECT count(*) AS n FROM payouts WHERE {where}")[0]["n"])


def progress(url: str, after: str) -> None:
    """Wait until more payouts have reached a final status since this blow."""
    before = count(url, FINISHED)
    wait_for(
        lambda: count(url, FINISHED) >= before + PROGRESS,
        timeout=RECOVERY_TIMEOUT_S,
        interval=0.2,
        what=f"{PROGRESS} more payouts to reach a final status after {after}",
    )


def all_ready(hosts: list[Host]) -> None:
    for host in hosts:
        wait_for(host.ready, timeout=RECOVERY_TIMEOUT_S, interval=0.2, what=f"{host.name} ready")


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
    every accepted press is a payout, periodic payouts keep their period, and no request is
    ever answered 500."""
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
        load = Load(hosts)
        try:
            sup.start()
            all_ready(hosts)
            for park in INSTANT_PARKS:
                register(hosts[0].url, park, instant=True, periodic=False)
                set_balance(billing_url, park, BALANCE)
            for park in PERIODIC_PARKS:
                set_balance(billing_url, park, BALANCE)
                register(hosts[0].url, park, instant=False, periodic=True)
            load.start()
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
        except BaseException:
            print(sup.logs())
            print(f"--- PostgreSQL ---\n{db.log_tail()}")
            raise
        finally:
            load.stop()
            sup.stop()
            set_faults(billing_url, **FAULTS_OFF)

        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as pg:
            payouts = rows(pg, "SELECT * FROM payouts")
            by_period = periodic_payouts(pg, PERIODIC_PARKS)
            moved = transfers(billing_url)
            by_status = collections.Counter((p["kind"], p["status"]) for p in payouts)
            answers = collections.Counter(a for p in load.presses for a in p.answers)
            billing_said = collections.Counter(r["status"] for r in billing_requests(billing_url))
            refusals = collections.Counter(p.code for p in load.presses if p.code is not None)
            accepted = [p for p in load.presses if p.payout_id is not None]
            with capsys.disabled():
                print(
                    f"\ndrill: {time.monotonic() - began:.0f} s, {round_no} round(s) of trouble"
                    f"\n  presses: {len(load.presses)} ({len(accepted)} accepted, refused"
                    f" {dict(refusals)}); answers {dict(sorted(answers.items()))};"
                    f" {load.transport_errors} connection errors retried"
                    f"\n  payouts by (kind, status): {dict(sorted(by_status.items()))}"
                    f"\n  Billing transfers: {len(moved)}; Billing requests: {stats(billing_url)},"
                    f" answered {dict(sorted(billing_said.items()))}"
                    f"\n  restarts by the supervisor: {dict(sup.restarts)}; PostgreSQL restarted"
                    f" {db.restarts}, crashed {db.crashes}; hosts killed {round_no}"
                    f"\n  logs: {tmp_path}"
                )

            assert [] == load.server_errors, "answered 5xx other than 503"
            assert [] == load.unanswered, "presses never answered"
            # The drill met what it claims to: an outage callers felt, periodic payouts, orders
            # applied but answered 500 (the hardest case for the caller).
            assert 0 < answers[503]
            assert 0 < sum(n for (kind, _), n in by_status.items() if kind == "periodic")
            assert 0 < billing_said[500]

            assert [] == [p for p in payouts if p["status"] not in FINAL]
            for park in INSTANT_PARKS + PERIODIC_PARKS:
                assert_books_agree(pg, billing_url, park)
            succeeded = {str(p["id"]) for p in payouts if p["status"] == "succeeded"}
            strays = [t for t in moved if t["idempotency_key"] not in succeeded]
            assert [] == strays, "Billing transfers that are no succeeded payout of ours"
            instant = {
                str(p["id"]): (p["park_id"], p["idempotency_key"])
                for p in payouts
                if p["kind"] == "instant"
            }
            told = {p.payout_id: (p.park, p.key) for p in accepted}
            assert len(accepted) == len(told), "two presses told the same payout"
            assert told == instant, "accepted presses and instant payouts differ"
            crowded = {p: spacing_violations(by_period[p], PERIOD) for p in PERIODIC_PARKS}
            assert {p: [] for p in PERIODIC_PARKS} == crowded, "periodic payouts too close"
