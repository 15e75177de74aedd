"""What the drills share: a PostgreSQL of their own, hosts under a supervisor, the presses of
a load generator retried with their keys, and the checker that says whether the books agree
after the storm (tests/e2e/test_drill.py, tests/e2e/test_partition_drill.py).

The checker reads only the public API, Billing's admin endpoints and the payouts table, so
it holds whatever the service changes inside.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fleet_payouts_devkit.postgres import EmbeddedPostgres, EmbeddedPostgresError
from fleet_payouts_devkit.processes import free_port
from psycopg.rows import DictRow, dict_row

from service.ops import migrate
from tests.conftest import API_TOKEN, with_dbname
from tests.helpers.api import (
    FINAL,
    assert_books_agree,
    periodic_payouts,
    press_headers,
    register,
    rows,
    set_balance,
    spacing_violations,
    transfers,
)
from tests.helpers.emulator import REPO_ROOT
from tests.helpers.procs import Proc, wait_for

# Every drill park's balance: more than any storm pays out, so no payout is skipped.
BALANCE = "100000000.00"

PRESSERS = 3
PRESS_PAUSE_S = 0.15  # pacing of each presser between presses, not synchronisation
RETRY_PAUSE_S = 0.2  # pacing of a press's retries (503, connection refused)
PRESS_DEADLINE_S = 90.0  # a press unanswered this long is a failure of its own
PRESS_TIMEOUT_S = 10.0  # a press unanswered this long is retried (its host may be cut off)
RESTART_DELAY_S = 0.5  # the supervisor's RestartSec: no busy loop while the database is down
PROGRESS = 12  # payouts that must reach a final status after each blow before the next
RECOVERY_TIMEOUT_S = 90.0


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
            # fast_unsafe turns synchronous_commit off: a commit is acknowledged before its WAL
            # leaves the server's memory, and `-m immediate` then loses the last ones, which
            # no real server does. fsync stays off: the kernel keeps what was written.
            # (postgresql.auto.conf outranks the settings file, and outlives restarts.)
            conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            conn.execute("SELECT pg_reload_conf()")
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
        # Added to `env` from the next spawn on (a skewed clock: libfaketime's variables).
        self.extra_env: dict[str, str] = {}
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
        env = {**self.env, **self.extra_env}
        proc = Proc(self.args(role), env, self.log_dir / f"{self.name}-{role}-{n}.log")
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

    def restart(self, host: Host) -> None:
        """SIGKILL both processes of the host and start them again (with its extra_env)."""
        self.kill_host(host)
        self.revive(host)

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
        procs = [proc for host in self.hosts for proc in host.history]
        for proc in procs:  # all at once: their grace periods run side by side
            if proc.alive():
                proc.popen.terminate()
        for proc in procs:
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

    def __init__(
        self,
        hosts: list[Host],
        parks: list[str],
        targets: Callable[[], list[Host]] | None = None,
    ) -> None:
        self.hosts = hosts
        self.parks = parks
        # The hosts a press may go to now (a load balancer's view): all of them by default.
        self.targets = targets or (lambda: self.hosts)
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
            if t.ident is not None:  # started
                t.join(timeout=PRESS_DEADLINE_S + 15)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(p.answers.count(status) for p in self.presses)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=PRESS_TIMEOUT_S) as client:
            while not self._stop.is_set():
                body = rng.choice([{}, {"amount": "10.00"}])
                self._press(client, rng, Press(rng.choice(self.parks), uuid.uuid4().hex, body))
                self._stop.wait(PRESS_PAUSE_S)

    def _press(self, client: httpx.Client, rng: random.Random, press: Press) -> None:
        with self.lock:
            self.presses.append(press)
        headers = press_headers(press.park, user=f"user-of-{press.park}", key=press.key)
        deadline = time.monotonic() + PRESS_DEADLINE_S
        while time.monotonic() < deadline:
            host = rng.choice(self.targets() or self.hosts)
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


def seed_parks(api: str, billing_url: str, instant: list[str], periodic: list[str]) -> None:
    """Register the drill's parks, each with a balance: presses pay the instant ones, the
    scan the periodic ones."""
    for park in instant:
        register(api, park, instant=True, periodic=False)
        set_balance(billing_url, park, BALANCE)
    for park in periodic:
        set_balance(billing_url, park, BALANCE)
        register(api, park, instant=False, periodic=True)


def count(url: str, where: str) -> int:
    """Payouts matching `where`, on a fresh connection: the server may have restarted since."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        return int(rows(conn, f"SELECT count(*) AS n FROM payouts WHERE {where}")[0]["n"])


def in_flight_report(url: str) -> str:
    """The payouts still in flight and their jobs, for a failing drill's output."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        found = rows(
            conn,
            "SELECT p.id, p.kind, p.status, p.updated_at, p.failure_message, j.id AS job,"
            " j.status AS job_status, j.scheduled_at, j.attempts, now() AS db_now"
            " FROM payouts p LEFT JOIN procrastinate_jobs j ON j.id = p.job_id"
            " WHERE p.status IN ('pending', 'processing')"
            " ORDER BY p.created_at LIMIT 20",
        )
    return "\n".join(str(dict(r)) for r in found)


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


# --- the checker ---------------------------------------------------------------------------


FEED_HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}  # every park's events


def feed_page(client: httpx.Client, api: str, after: str | None) -> tuple[int, dict[str, Any]]:
    """One GET /v1/events page of every park's events: status and body."""
    params: dict[str, int | str] = (
        {"limit": 100} if after is None else {"limit": 100, "after": after}
    )
    r = client.get(f"{api}/v1/events", params=params, headers=FEED_HEADERS)
    body: dict[str, Any] = (
        r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    )
    return r.status_code, body


class FeedTail:
    """A consumer following GET /v1/events during the storm, as Opteum would: it keeps its
    cursor, and retries a page that failed (503, a host cut off) through another host. What
    it saw must equal the whole feed read after the storm: an event committed behind a
    cursor already handed out would be missing here."""

    def __init__(self, targets: Callable[[], list[Host]]) -> None:
        self.targets = targets
        self.events: list[dict[str, Any]] = []
        self.cursor: str | None = None
        self.answers: collections.Counter[int] = collections.Counter()
        self.server_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed-tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=PRESS_TIMEOUT_S + 15)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=PRESS_TIMEOUT_S) as client:
            while not self._stop.is_set():
                hosts = self.targets()
                if not hosts or not self.read(client, rng.choice(hosts).url):
                    self._stop.wait(0.3)  # pacing of an idle consumer, not synchronisation

    def read(self, client: httpx.Client, api: str) -> bool:
        """One page through `api`; True when it brought events."""
        try:
            status, page = feed_page(client, api, self.cursor)
        except httpx.TransportError:
            return False
        self.answers[status] += 1
        if status >= 500 and status != 503:
            self.server_errors.append(f"{status} from {api}/v1/events: {page}")
        if status != 200:
            return False
        self.events.extend(page["events"])
        self.cursor = page["next_cursor"]
        return bool(page["events"])

    def catch_up(self, api: str) -> None:
        """After the storm: read on to the end of the feed through `api`."""
        with httpx.Client(timeout=PRESS_TIMEOUT_S) as client:
            while self.read(client, api):
                pass


def read_feed(api: str) -> list[dict[str, Any]]:
    """Every event of every park, from the start, following next_cursor to an empty page."""
    found: list[dict[str, Any]] = []
    after = None
    with httpx.Client(timeout=PRESS_TIMEOUT_S) as client:
        while True:
            status, page = feed_page(client, api, after)
            assert 200 == status, page
            if not page["events"]:
                return found
            found.extend(page["events"])
            after = page["next_cursor"]


def feed_problems(feed: list[dict[str, Any]], payouts: list[DictRow]) -> list[str]:
    """What is wrong with the feed: an event twice, a payout without exactly its creation
    then its final status (in that order), an event of a payout we do not have."""
    problems = []
    ids = [e["id"] for e in feed]
    if len(ids) != len(set(ids)):
        twice = [i for i, n in collections.Counter(ids).items() if n > 1]
        problems.append(f"events read twice: {twice[:5]}")
    by_payout: dict[str, list[str]] = collections.defaultdict(list)
    for event in feed:
        by_payout[event["payout"]["id"]].append(event["type"])
    for p in payouts:
        expected = ["payout.created", f"payout.{p['status']}"]
        if by_payout.pop(str(p["id"]), []) != expected:
            problems.append(f"payout {p['id']} ({p['status']}): {by_payout.get(str(p['id']))}")
    problems += [f"events of unknown payout {k}: {v}" for k, v in by_payout.items()]
    return problems


def audit_verify(url: str) -> subprocess.CompletedProcess[str]:
    """`fleet-payouts audit verify` on the drill's database: exit 0 when every link holds."""
    return subprocess.run(
        [sys.executable, "-m", "service", "audit", "verify"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": url, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Verdict:
    """The books after a storm, for the drill's figures."""

    payouts: list[DictRow]
    by_status: collections.Counter[tuple[str, str]]
    longest_in_flight: timedelta
    transfers: int


def check_books(
    url: str,
    billing: str,
    load: Load,
    periodic_parks: list[str],
    period: timedelta,
) -> Verdict:
    """The books after the storm, asserted: every payout final, per park Billing's transfers
    are our succeeded payouts (each once, its amount) and nothing else moved money, every
    accepted press is one instant payout, periodic payouts kept their period, no request
    answered 5xx other than 503 and none left unanswered, the audit log intact."""
    assert [] == load.server_errors, "answered 5xx other than 503"
    assert [] == load.unanswered, "presses never answered"
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as pg:
        payouts = rows(pg, "SELECT * FROM payouts")
        assert [] == [p for p in payouts if p["status"] not in FINAL], "payouts left in flight"
        moved = transfers(billing)
        for park in sorted({p["park_id"] for p in payouts} | {t["park_id"] for t in moved}):
            assert_books_agree(pg, billing, park)
        succeeded = {str(p["id"]) for p in payouts if p["status"] == "succeeded"}
        strays = [t for t in moved if t["idempotency_key"] not in succeeded]
        assert [] == strays, "Billing transfers that are no succeeded payout of ours"
        instant = {
            str(p["id"]): (p["park_id"], p["idempotency_key"])
            for p in payouts
            if p["kind"] == "instant"
        }
        accepted = [p for p in load.presses if p.payout_id is not None]
        told = {p.payout_id: (p.park, p.key) for p in load.presses if p.payout_id is not None}
        assert len(accepted) == len(told), "two presses told the same payout"
        by_key = {(p.park, p.key): p for p in load.presses}
        unlike = {
            i: (told.get(i), instant.get(i), by_key.get(instant.get(i) or ("", "")))
            for i in told.keys() ^ instant.keys() | {i for i in told if told[i] != instant.get(i)}
        }
        # payout id: (what the press was told, the payout's row, the press with that key)
        assert {} == unlike, "accepted presses and instant payouts differ"
        by_period = periodic_payouts(pg, periodic_parks)
        crowded = {p: spacing_violations(by_period[p], period) for p in periodic_parks}
        assert {p: [] for p in periodic_parks} == crowded, "periodic payouts too close"
        longest = rows(
            pg, "SELECT coalesce(max(completed_at - created_at), interval '0') AS d FROM payouts"
        )[0]["d"]
    verified = audit_verify(url)
    assert 0 == verified.returncode, f"audit verify: {verified.stdout}{verified.stderr}"
    return Verdict(
        payouts,
        collections.Counter((p["kind"], p["status"]) for p in payouts),
        longest,
        len(moved),
    )
