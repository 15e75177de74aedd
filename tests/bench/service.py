"""`make bench` (python -m tests.bench.service): the service's performance figures, each against a
baseline measured in the same run on the same machine.

1. instant request throughput: POST /v1/payouts/instant per second at 8
   concurrent clients, vs pgbench running the same SQL (the press's one function
   call; the five-statement transaction of before migration 0014 printed too), with
   the API's CPU and DB statements per press, PostgreSQL's CPU per press and per
   call, and the ratio CPU alone would allow;
2. DB statements per instant payout, from the request to `succeeded`
   (pg_stat_statements, idle background subtracted);
3. periodic scan of 80,000 due parks: time and peak memory vs one
   INSERT ... SELECT plus one batch_defer_async; peak memory at 10k vs 80k;
4. Billing calls per periodic payout, for 1,000 due parks.

Everything runs on a PostgreSQL of its own (EmbeddedPostgres in a temp dir,
fsync off as in the QUEUE-NOTES baselines) unless BENCH_DATABASE_URL names a
server whose user may create databases and roles. Each figure gets a fresh,
migrated database. The Billing emulator, the API and the workers run as real
subprocesses and are all stopped at the end.

Environment: BENCH_SCALE (default 1.0) scales durations and park counts;
BENCH_VERBOSE=1 lists the top statements of figures 2 and 4; BENCH_DURABLE=1 keeps
fsync on in the embedded server; BENCH_FAIL_ON_MISS=1 exits 1 on any MISS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import IO, Any, LiteralString, cast

import httpx
import psycopg
from fleet_payouts_devkit.processes import free_port
from procrastinate.types import JSONValue
from psycopg import sql
from psycopg.rows import TupleRow

from service.billing.client import BillingClient, Budget
from service.core import db
from service.core import settings as settings_module
from service.core.settings import Settings
from service.ops import migrate
from service.payouts import periodic
from service.payouts.execution import Deps
from service.payouts.instant import InstantRequest
from service.worker import tasks
from service.worker.app import app as queue_app

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
PGBENCH_THREADS = 2
BILLING_RPS = "1000"
USER_ID = "bench-user"
API_TOKEN = "bench-api-" + secrets.token_hex(12)
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(12)
STOP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 30.0
# pgbench clients take park ids client_id * PGB_STRIDE + n, n = 1, 2, ...
PGB_STRIDE = 10_000_000
# The periodic scan must not run while figure 2 counts statements.
NEVER_CRON = "0 0 1 1 *"
# Settings the children must not inherit from the caller's shell.
_SERVICE_VARS = (
    "DATABASE_URL",
    "API_TOKENS",
    "ADMIN_TOKENS",
    "LOG_LEVEL",
    "WORKER_POLL_SECONDS",
    "STALLED_JOB_SECONDS",
    "RETRY_BACKOFF_CAP_SECONDS",
    "SHUTDOWN_GRACE_SECONDS",
)
_SERVICE_PREFIXES = ("PAYOUT_", "BILLING_", "INSTANT_", "PERIODIC_", "SENTRY_", "BENCH_")

Conn = psycopg.AsyncConnection[TupleRow]


# --- figures ---------------------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    number: int
    name: str
    measured: str
    baseline: str
    ratio: float | None
    ratio_label: str
    goal: str
    passed: bool | None  # None: the figure could not be measured
    details: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "ERROR"}[self.passed]

    def render(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "n/a"
        lines = [
            f"  measured : {self.measured}",
            f"  baseline : {self.baseline}",
            f"  ratio    : {ratio} ({self.ratio_label})",
            f"  goal     : {self.goal}  ->  {self.verdict}",
        ]
        lines += [f"    {d}" for d in self.details]
        return "\n".join(lines)


def _error_figure(number: int, name: str, exc: BaseException) -> Figure:
    return Figure(number, name, f"ERROR: {exc!r}", "-", None, "-", "-", None)


def _note(message: str) -> None:
    print(f"  . {message}", flush=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- processes -------------------------------------------------------------------------


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


def _read_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One subprocess of the bench (emulator, API, worker) with its log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        return _read_tail(self.log, lines)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (Linux /proc; 0.0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_until(
    what: str, check: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if await check():
                return
        except (httpx.TransportError, psycopg.OperationalError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def _with_url(
    url: str, *, dbname: str | None = None, user: str | None = None, password: str | None = None
) -> str:
    """The URL with another database or user: the service takes URLs, not key=value strings."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        host = netloc.rsplit("@", 1)[-1]
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        netloc = f"{auth}@{host}"
    path = "/" + urllib.parse.quote(dbname, safe="") if dbname is not None else parts.path
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path))


def _dbname(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/"))


async def _connect(url: str) -> Conn:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def _scalar(conn: Conn, query: LiteralString, params: Sequence[Any] | None = None) -> Any:
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None
    return row[0]


# --- the bench's world: server, databases, emulator, service processes -----------------


class Bench:
    def __init__(self, server_url: str, workdir: Path, scale: float, verbose: bool) -> None:
        self.server_url = server_url
        self.workdir = workdir
        self.scale = scale
        self.verbose = verbose
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.children: list[Child] = []
        self.databases: list[str] = []
        self.prefix = f"fpbench_{os.getpid()}"
        self.template = f"{self.prefix}_template"
        self.observer_role = f"{self.prefix}_observer"
        self.observer_password = secrets.token_hex(16)
        self.observer_created = False
        self.billing_url = ""
        self.emulator: Child | None = None
        self._counter = 0

    # databases

    def url_of(self, name: str) -> str:
        return _with_url(self.server_url, dbname=name)

    async def setup(self) -> None:
        async with await _connect(self.server_url) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.template)
                )
            )
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        self.databases.append(self.template)
        await migrate.migrate(self.url_of(self.template))
        await self.start_emulator()

    async def create_db(self, label: str) -> str:
        """A fresh database, cloned from the migrated template."""
        self._counter += 1
        name = f"{self.prefix}_{self._counter}_{label}"
        async with await _connect(self.server_url) as conn:
            await conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(self.template)
                )
            )
        self.databases.append(name)
        return self.url_of(name)

    async def drop_db(self, url: str) -> None:
        name = _dbname(url)
        async with await _connect(self.server_url) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        with contextlib.suppress(ValueError):
            self.databases.remove(name)

    async def observer_url(self, url: str) -> str:
        """A superuser role of the bench's own, so its statements are not counted."""
        if not self.observer_created:
            async with await _connect(self.server_url) as conn:
                await conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                        sql.Identifier(self.observer_role), sql.Literal(self.observer_password)
                    )
                )
            self.observer_created = True
        return _with_url(url, user=self.observer_role, password=self.observer_password)

    # processes

    def child_env(self, db_url: str | None, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_SERVICE_PREFIXES) and k not in _SERVICE_VARS
        }
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
        if db_url is not None:
            env |= {
                "DATABASE_URL": db_url,
                "BILLING_URL": self.billing_url,
                "API_TOKENS": API_TOKEN,
                "ADMIN_TOKENS": ADMIN_TOKEN,
                "BILLING_RPS": BILLING_RPS,
                "SHUTDOWN_GRACE_SECONDS": "5",
                "LOG_LEVEL": "INFO",
            }
        env |= extra
        return env

    async def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log = self.logs / f"{name}.log"
        out = _open_log(log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
            )
        finally:
            out.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def stop(self, *children: Child) -> None:
        await asyncio.gather(*(c.stop() for c in children))
        for child in children:
            with contextlib.suppress(ValueError):
                self.children.remove(child)

    async def stop_services(self) -> None:
        """Stop every child but the emulator, which serves the whole run."""
        await self.stop(*(c for c in self.children if c is not self.emulator))

    async def _wait_http(self, child: Child, url: str) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:

            async def ready() -> bool:
                if not child.alive:
                    raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
                return (await client.get(url)).status_code == 200

            await _wait_until(f"{child.name} on {url}", ready, within=READY_TIMEOUT_S)

    async def start_emulator(self) -> None:
        port = free_port()
        env = self.child_env(None)
        child = await self.spawn(
            "billing-emulator",
            [sys.executable, "-m", "fleet_payouts_devkit.emulator", "--port", str(port)],
            env,
        )
        self.billing_url = f"http://127.0.0.1:{port}"
        self.emulator = child
        await self._wait_http(child, f"{self.billing_url}/admin/stats")

    async def api(self, db_url: str, extra: dict[str, str] | None = None) -> tuple[Child, str]:
        port = free_port()
        child = await self.spawn(
            f"api-{port}",
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            self.child_env(db_url, **(extra or {})),
        )
        url = f"http://127.0.0.1:{port}"
        await self._wait_http(child, f"{url}/ready")
        return child, url

    async def worker(
        self, db_url: str, extra: dict[str, str] | None = None, *, metrics_port: int | None = None
    ) -> Child:
        self._counter += 1
        args = [sys.executable, "-m", "service", "worker", "--concurrency", "10"]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        return await self.spawn(
            f"worker-{self._counter}", args, self.child_env(db_url, **(extra or {}))
        )

    # the emulator's admin API

    async def reset_emulator(self) -> None:
        async with httpx.AsyncClient(base_url=self.billing_url, timeout=10) as client:
            (await client.post("/admin/reset")).raise_for_status()

    async def emulator_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.billing_url, timeout=10) as client:
            response = await client.get("/admin/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    async def set_balances(self, parks: Iterable[str], available: str) -> None:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(
            base_url=self.billing_url, timeout=10, limits=limits
        ) as client:
            gate = asyncio.Semaphore(16)

            async def put(park: str) -> None:
                async with gate:
                    response = await client.put(
                        f"/admin/balances/{park}", json={"available": available, "currency": "RUB"}
                    )
                    response.raise_for_status()

            await asyncio.gather(*(put(p) for p in parks))

    def settings(self, db_url: str) -> Settings:
        env = self.child_env(db_url)
        return settings_module.load(env)

    async def close(self) -> None:
        for child in list(self.children):
            if not child.alive and child.proc.returncode not in (0, -signal.SIGTERM):
                print(f"  ! {child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        await self.stop(*self.children)
        with contextlib.suppress(psycopg.Error):
            async with await _connect(self.server_url) as conn:
                for name in reversed(self.databases):
                    await conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                if self.observer_created:
                    await conn.execute(
                        sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.observer_role))
                    )
        self.databases.clear()


# --- instant requests ------------------------------------------------------------------


@dataclasses.dataclass
class Presses:
    statuses: collections.Counter[int]
    seconds: float
    ran_out: bool

    @property
    def accepted(self) -> int:
        return self.statuses[202]

    @property
    def others(self) -> dict[int, int]:
        return {status: n for status, n in self.statuses.items() if status != 202}

    @property
    def refused(self) -> int:
        return sum(self.others.values())


@contextlib.asynccontextmanager
async def _api_client(url: str, concurrency: int = CLIENTS) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=30.0,
        limits=limits,
    ) as client:
        yield client


async def _press(
    client: httpx.AsyncClient,
    parks: Iterator[str],
    *,
    seconds: float = math.inf,
    concurrency: int = CLIENTS,
) -> Presses:
    """`concurrency` clients press "Pay out now", one park each, until time or parks run out."""
    statuses: collections.Counter[int] = collections.Counter()
    ran_out = False
    start = time.perf_counter()
    deadline = start + seconds

    async def one_client() -> None:
        nonlocal ran_out
        while time.perf_counter() < deadline:
            park = next(parks, None)
            if park is None:
                ran_out = True
                return
            response = await client.post(
                "/v1/payouts/instant",
                headers={"X-Park-Id": park, "X-User-Id": USER_ID, "Idempotency-Key": f"k-{park}"},
            )
            statuses[response.status_code] += 1

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return Presses(statuses, time.perf_counter() - start, ran_out)


# wrk drives figure 1 when it is installed: a C load generator costs the shared
# 2 CPUs far less per request than an httpx client in this process, which
# would otherwise take CPU from the API and PostgreSQL it is measuring.
WRK_THREADS = 1
# Each wrk thread takes parks svc-<first + t * per + n>, n = 0, 1, ..., per - 1,
# each with its own Idempotency-Key, and stops when its range is used up.
WRK_LUA = r"""
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end
function init(args)
  first = tonumber(args[1]); per = tonumber(args[2]); user = args[3]
  n = 0; statuses = {}; ran_out = 0
  base = first + tid * per
end
function request()
  if n >= per then
    ran_out = 1
    wrk.thread:stop()
  end
  local park = "svc-" .. (base + n)
  n = n + 1
  local headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
  headers["X-Park-Id"] = park
  headers["X-User-Id"] = user
  headers["Idempotency-Key"] = "k-" .. park
  return wrk.format("POST", "/v1/payouts/instant", headers, "")
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local all, out, parts = {}, 0, {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do all[k] = (all[k] or 0) + v end
    if t:get("ran_out") == 1 then out = 1 end
  end
  for k, v in pairs(all) do table.insert(parts, k .. ":" .. v) end
  io.write(string.format("FP-RESULT %d %d %d %d %s\n", summary.duration, out,
    latency:percentile(50), latency:percentile(99), table.concat(parts, ",")))
end
"""
_WRK_RE = re.compile(r"^FP-RESULT (\d+) ([01]) (\d+) (\d+) ?(\S*)$", re.MULTILINE)


@dataclasses.dataclass
class WrkPresses(Presses):
    p50_ms: float
    p99_ms: float
    cpu_seconds: float  # wrk's own user + system CPU


async def _wrk_press(
    wrk: str, script: Path, url: str, *, first: int, parks: int, seconds: float
) -> WrkPresses:
    """CLIENTS connections press "Pay out now" for `seconds`, parks first.. first+parks-1."""
    per_thread = parks // WRK_THREADS
    args = [wrk, "-t", str(WRK_THREADS), "-c", str(CLIENTS), "-d", f"{max(1, math.ceil(seconds))}s"]
    args += ["--timeout", "30s", "-H", f"Authorization: Bearer {API_TOKEN}", "-s", str(script)]
    args += [url, "--", str(first), str(per_thread), USER_ID]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    found = _WRK_RE.search(text)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"wrk exited with {proc.returncode}:\n{text}\n{err.decode(errors='replace')}"
        )
    duration_us, ran_out, p50_us, p99_us, pairs = found.groups()
    statuses: collections.Counter[int] = collections.Counter()
    for pair in filter(None, pairs.split(",")):
        status, count = pair.split(":")
        statuses[int(status)] += int(count)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkPresses(
        statuses,
        int(duration_us) / 1e6,
        ran_out == "1",
        int(p50_us) / 1000,
        int(p99_us) / 1000,
        cpu,
    )


def _fill(query: str, **exprs: str) -> str:
    """A named query with its %(name)s placeholders replaced by pgbench expressions."""
    for name, expr in exprs.items():
        query = query.replace(f"%({name})s", expr)
    if "%(" in query:
        raise ValueError(f"unfilled placeholder in {query!r}")
    return query


def pgbench_script(max_amount: Decimal) -> str:
    """The service's instant transaction, statement for statement, for pgbench -M prepared.

    Client c's n-th transaction works on park 'pgb-<c * PGB_STRIDE + n>', so every
    transaction sees a park with nothing in flight, as the service's requests do.
    """
    park = "('pgb-' || :id::text)"
    key = "('pgb-key-' || :id::text)"
    payout_id = "md5('pgb-' || :id::text)::uuid"
    fingerprint = InstantRequest("p", USER_ID, "k", "r", None).fingerprint
    q = db.queries("payouts")
    lock = _fill(db.queries("parks")["lock"], park_id=park)
    state = _fill(q["park_state"], park_id=park, idempotency_key=key)
    insert = _fill(
        q["insert_instant"],
        id=payout_id,
        park_id=park,
        idempotency_key=key,
        request_fingerprint=f"'{fingerprint}'",
        requested_by=f"'{USER_ID}'",
        request_id="('pgb-req-' || :id::text)",
        requested_amount="NULL",
        max_amount=f"{max_amount}",
        min_amount="1.00",
        fee_percent="NULL",
        fee_fixed="NULL",
        queue="'payouts'",
        task="'execute_payout'",
        priority="50",
        details=f"jsonb_build_object('idempotency_key', {key}, 'requested_amount', NULL)",
    )
    return "\n".join(
        [
            "\\set n :n + 1",
            f"\\set id :client_id * {PGB_STRIDE} + :n",
            "BEGIN;",
            f"{lock};",
            f"{state};",
            f"{insert};",
            "COMMIT;",
            "",
        ]
    )


def pgbench_press_script(max_amount: Decimal, min_amount: Decimal, cooldown: float) -> str:
    """The service's press as it runs it now: one call of payouts_press_instant (migration
    0014) in autocommit, with the parameters the API sends, for pgbench -M prepared."""
    park = "('pgb-' || :id::text)"
    key = "('pgb-key-' || :id::text)"
    fingerprint = InstantRequest("p", USER_ID, "k", "r", None).fingerprint
    call = _fill(
        db.queries("payouts")["press_instant"],
        id="md5('pgb-' || :id::text)::uuid",
        park_id=park,
        idempotency_key=key,
        request_fingerprint=f"'{fingerprint}'",
        requested_by=f"'{USER_ID}'",
        request_id="('pgb-req-' || :id::text)",
        requested_amount="NULL::numeric",
        max_amount=f"{max_amount}",
        min_amount=f"{min_amount}",
        cooldown=f"interval '{cooldown} seconds'",
        details=f"jsonb_build_object('idempotency_key', {key}, 'requested_amount', NULL)",
        queue="'payouts'",
        task="'execute_payout'",
        priority="50",
    )
    return "\n".join(["\\set n :n + 1", f"\\set id :client_id * {PGB_STRIDE} + :n", f"{call};", ""])


def pg_processes(data_dir: Path) -> dict[int, float]:
    """CPU seconds so far of the postmaster of `data_dir` and of each of its children
    (Linux /proc; empty when the server is not local or not ours)."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster or ppid == postmaster:
            # utime, stime, and the CPU of children already reaped (cutime, cstime).
            found[pid] = sum(int(f) for f in fields[11:15]) / tick
    return found


def pg_cpu_since(data_dir: Path, before: dict[int, float]) -> float | None:
    """CPU seconds the server's processes used since `before` (None when not measurable);
    backends that exited meanwhile are in the postmaster's cutime and cstime."""
    now = pg_processes(data_dir)
    if not now or not before:
        return None
    return sum(now[pid] - before.get(pid, 0.0) for pid in now)


def _ms_each(seconds: float | None, n: int) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds / max(1, n):.2f} ms"


@dataclasses.dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed: int


_TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_DONE_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


async def run_pgbench(script: Path, url: str, seconds: int) -> PgbenchResult:
    pgbench = shutil.which("pgbench") or "/usr/bin/pgbench"
    args = [pgbench, "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", str(PGBENCH_THREADS)]
    args += ["-T", str(seconds), "-D", "n=0", "-f", str(script), url]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    tps, done = _TPS_RE.search(text), _DONE_RE.search(text)
    if proc.returncode != 0 or tps is None or done is None:
        raise RuntimeError(
            f"pgbench exited with {proc.returncode}:\n{text}\n{err.decode(errors='replace')}"
        )
    failed = _FAILED_RE.search(text)
    return PgbenchResult(
        float(tps.group(1)), int(done.group(1)), int(failed.group(1)) if failed else 0
    )


async def _register_pgbench_parks(url: str, per_client: int) -> None:
    async with await _connect(url) as conn:
        await conn.execute(
            "INSERT INTO parks (park_id, instant_payouts_enabled) "
            "SELECT 'pgb-' || (c::bigint * %s + g), true "
            "FROM generate_series(0, %s) c, generate_series(1, %s) g",
            (PGB_STRIDE, CLIENTS - 1, per_client),
        )
        await conn.execute("ANALYZE")


async def _pgbench_measured(
    b: Bench, script: Path, url: str, seconds: int
) -> tuple[PgbenchResult, float | None, float]:
    """pgbench's result, the server's CPU during it (None: not measurable), pgbench's own."""
    pg_before = pg_processes(b.workdir / "pg")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = await run_pgbench(script, url, seconds)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return result, pg_cpu_since(b.workdir / "pg", pg_before), own


async def figure_instant_throughput(b: Bench) -> Figure:
    seconds = max(1, round(10 * b.scale))
    warmup = min(1.0, seconds / 5)
    # More parks than the API or pgbench could use up, one per request.
    service_parks = 2000 * (seconds + 2)
    pgbench_parks = 1500 * (seconds + 1)
    url = await b.create_db("instant")
    press_url = await b.create_db("instant-pgbench")
    try:
        async with await _connect(url) as conn:
            await conn.execute(
                "INSERT INTO parks (park_id, instant_payouts_enabled) "
                "SELECT 'svc-' || g, true FROM generate_series(1, %s) g",
                (service_parks,),
            )
        await _register_pgbench_parks(url, pgbench_parks)
        await _register_pgbench_parks(press_url, pgbench_parks)
        _note(f"{service_parks:,} + 2 x {CLIENTS * pgbench_parks:,} parks registered")

        api, api_url = await b.api(url)
        wrk = shutil.which("wrk")
        presses: Presses
        metrics_url = [f"{api_url}/metrics"]
        if wrk is not None:
            generator = f"wrk -t {WRK_THREADS} -c {CLIENTS} (Lua script: one park and key each)"
            lua = b.workdir / "instant.lua"
            lua.write_text(WRK_LUA)
            # wrk runs whole seconds: the warm-up takes the first 2,000 parks a second.
            warm_parks = 2000 * (math.ceil(warmup) + 1)
            await _wrk_press(wrk, lua, api_url, first=1, parks=warm_parks, seconds=warmup)
            sent_before = await _db_queries_sent(metrics_url)
            pg_before = pg_processes(b.workdir / "pg")
            cpu_before = api.cpu_seconds()
            presses = await _wrk_press(
                wrk,
                lua,
                api_url,
                first=warm_parks + 1,
                parks=service_parks - warm_parks,
                seconds=seconds,
            )
            api_cpu = api.cpu_seconds() - cpu_before
        else:
            generator = "httpx.AsyncClient in the bench process (wrk not found: install it"
            generator += " for a load generator that takes less CPU from the API and PostgreSQL)"
            _note("wrk not found: falling back to the in-process httpx load generator")
            parks = iter([f"svc-{i}" for i in range(1, service_parks + 1)])
            async with _api_client(api_url) as client:
                await _press(client, parks, seconds=warmup)
                sent_before = await _db_queries_sent(metrics_url)
                pg_before = pg_processes(b.workdir / "pg")
                cpu_before = api.cpu_seconds()
                presses = await _press(client, parks, seconds=seconds)
                api_cpu = api.cpu_seconds() - cpu_before
        pg_service = pg_cpu_since(b.workdir / "pg", pg_before)
        # Every statement the API process sent (the gauges' refresh on the admin pool
        # included, a handful every 15 s): an upper bound on the press's own.
        sent = await _db_queries_sent(metrics_url) - sent_before
        await b.stop(api)
        service_rps = presses.accepted / presses.seconds
        _note(f"service: {service_rps:.1f} req/s")

        settings = b.settings(url)
        five = b.workdir / "instant.pgbench"
        five.write_text(pgbench_script(settings.payout_max_amount))
        pg5, pg5_cpu, _ = await _pgbench_measured(b, five, url, seconds)
        _note(f"pgbench, five statements: {pg5.tps:.1f} tps")
        one = b.workdir / "press.pgbench"
        one.write_text(
            pgbench_press_script(
                settings.payout_max_amount,
                settings.payout_min_amount,
                settings.instant_cooldown.total_seconds(),
            )
        )
        pg, pg_cpu, own = await _pgbench_measured(b, one, press_url, seconds)
        _note(f"pgbench, the press's one call: {pg.tps:.1f} tps")
        async with await _connect(press_url) as conn:
            made = await _scalar(conn, "SELECT count(*) FROM payouts WHERE park_id LIKE 'pgb-%'")
    finally:
        await b.drop_db(url)
        await b.drop_db(press_url)

    ratio = service_rps / pg.tps if pg.tps else 0.0
    n = max(1, presses.accepted)
    api_ms = 1000 * api_cpu / n
    wrk_cpu = presses.cpu_seconds if isinstance(presses, WrkPresses) else 0.0
    details = [
        f"service: {presses.accepted:,} accepted (202) in {presses.seconds:.1f} s after a "
        f"{warmup:.1f} s warm-up; non-202: {presses.others}"
        + ("; RAN OUT OF PARKS" if presses.ran_out else ""),
        f"API process CPU: {api_ms:.2f} ms per press (goal <= 0.6 ms: "
        f"{'PASS' if api_ms <= 0.6 else 'MISS'}), {100 * api_cpu / presses.seconds:.0f}% of one "
        f"core (the load generator shares the {os.cpu_count()} CPUs with it and PostgreSQL)",
        f"DB statements the API sent per press: {sent / n:.2f} (goal <= 2: "
        f"{'PASS' if sent / n <= 2 else 'MISS'}; its /metrics, gauges included)",
        f"load generator: {generator}"
        + (
            f"; its CPU {1000 * presses.cpu_seconds / max(1, sum(presses.statuses.values())):.3f}"
            f" ms per request; latency p50 {presses.p50_ms:.1f} ms, p99 {presses.p99_ms:.1f} ms"
            if isinstance(presses, WrkPresses)
            else ""
        ),
        f"pgbench, the press's one call ({one.name}, the ratio's baseline): "
        f"{pg.transactions:,} transactions ({pg.failed} failed) in {seconds} s, "
        f"{made:,} payouts written",
        f"pgbench, the five statements the press ran before migration 0014 ({five.name}: "
        f"BEGIN; parks.lock; park_state; insert_instant; COMMIT): {pg5.tps:,.1f} tps "
        f"({pg5.failed} failed); service / that: {service_rps / pg5.tps if pg5.tps else 0:.2f}",
        f"PostgreSQL CPU: {_ms_each(pg_service, n)} per press (service), "
        f"{_ms_each(pg_cpu, pg.transactions)} per call (pgbench), "
        f"{_ms_each(pg5_cpu, pg5.transactions)} per five-statement transaction; "
        f"pgbench's own {_ms_each(own, pg.transactions)} per call",
    ]
    if pg_service is not None and pg_cpu is not None and pg.transactions:
        # Were both runs bound by CPU alone on the same cores, the ratio would be the
        # inverse ratio of the CPU each press takes from them, all processes included.
        per_press = (pg_service + api_cpu + wrk_cpu) / n
        per_call = (pg_cpu + own) / pg.transactions
        details.append(
            f"CPU-bound ceiling of the ratio: {per_call / per_press:.2f} (CPU per pgbench call "
            f"{1000 * per_call:.2f} ms / per press {1000 * per_press:.2f} ms, API + PostgreSQL "
            "+ load generator); below it, the press waits on something else than CPU"
        )
    return Figure(
        1,
        "instant request throughput",
        f"{service_rps:,.1f} requests/s (API process, {CLIENTS} concurrent clients"
        f"{' via wrk' if isinstance(presses, WrkPresses) else ' via httpx'}, no worker)",
        f"{pg.tps:,.1f} tps (pgbench -M prepared -c {CLIENTS} -j {PGBENCH_THREADS}, "
        "the same statement: the press's one function call, same server)",
        ratio,
        "service / pgbench",
        "ratio >= 0.50",
        ratio >= 0.5 and presses.refused == 0,
        details,
    )


# --- statements per instant payout -----------------------------------------------------


async def _statement_counts(obs: Conn, dbname: str, role: str) -> tuple[int, int]:
    """Calls of the service role in the bench database: (top-level, all incl. nested)."""
    row = await (
        await obs.execute(
            "SELECT coalesce(sum(s.calls) FILTER (WHERE s.toplevel), 0)::bigint, "
            "       coalesce(sum(s.calls), 0)::bigint "
            "FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
            "WHERE d.datname = %s AND r.rolname = %s",
            (dbname, role),
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _top_statements(obs: Conn, dbname: str, role: str, k: int) -> list[str]:
    rows = await (
        await obs.execute(
            "SELECT s.calls, s.toplevel, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60) "
            "FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
            "WHERE d.datname = %s AND r.rolname = %s "
            "ORDER BY s.toplevel DESC, s.calls DESC LIMIT 25",
            (dbname, role),
        )
    ).fetchall()
    return [
        f"{calls:>6} {calls / k:6.2f}/payout {'top ' if top else 'nest'} {query}"
        for calls, top, query in rows
    ]


async def _top_by_time(obs: Conn, dbname: str, role: str) -> list[str]:
    rows = await (
        await obs.execute(
            "SELECT s.calls, s.total_exec_time, s.mean_exec_time, "
            "       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60) "
            "FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
            "WHERE d.datname = %s AND r.rolname = %s AND s.toplevel "
            "ORDER BY s.total_exec_time DESC LIMIT 12",
            (dbname, role),
        )
    ).fetchall()
    return [
        f"{calls:>6} calls {total:8.0f} ms total {mean:7.2f} ms mean  {query}"
        for calls, total, mean, query in rows
    ]


_METRIC_RE = re.compile(
    r"^fleet_payouts_billing_requests_total"
    r'\{endpoint="([a-z_]+)",outcome="([a-z_]+)"\} ([0-9.e+]+)$',
    re.MULTILINE,
)


async def _billing_calls_by_endpoint(metrics_url: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(metrics_url)).text
    calls: collections.Counter[str] = collections.Counter()
    for endpoint, outcome, value in _METRIC_RE.findall(text):
        calls[f"{endpoint}/{outcome}"] += int(float(value))
    return {k: v for k, v in sorted(calls.items()) if v}


async def _db_queries_sent(metrics_urls: Sequence[str]) -> float:
    """fleet_payouts_db_queries_total summed over the processes' /metrics."""
    total = 0.0
    async with httpx.AsyncClient(timeout=5) as client:
        for url in metrics_urls:
            text = (await client.get(url)).text
            total += sum(float(v) for v in _DB_QUERIES_RE.findall(text))
    return total


_DB_QUERIES_RE = re.compile(r"^fleet_payouts_db_queries_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


async def figure_statements(b: Bench) -> Figure:
    k = max(20, round(200 * b.scale))
    # 30 s: a whole number of every background period (heartbeats 10 s, gauges
    # and maintenance 15 s), so the idle and the busy window see the same ticks.
    window = max(2.0, 30.0 * b.scale)
    url = await b.create_db("statements")
    dbname = _dbname(url)
    parks = [f"st-{i}" for i in range(1, k + 1)]
    try:
        async with await _connect(url) as conn:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute(
                "INSERT INTO parks (park_id, instant_payouts_enabled) "
                "SELECT 'st-' || g, true FROM generate_series(1, %s) g",
                (k,),
            )
            role = str(await _scalar(conn, "SELECT current_user"))
        await b.reset_emulator()
        await b.set_balances(parks, "1000.00")
        env = {"PERIODIC_SCAN_CRON": NEVER_CRON}
        _api, api_url = await b.api(url, env)
        worker_metrics = free_port()
        worker = await b.worker(url, env, metrics_port=worker_metrics)
        metrics = [f"{api_url}/metrics", f"http://127.0.0.1:{worker_metrics}/metrics"]
        async with await _connect(await b.observer_url(url)) as obs:

            async def worker_ready() -> bool:
                if not worker.alive:
                    raise RuntimeError(f"worker exited:\n{worker.tail()}")
                return int(await _scalar(obs, "SELECT count(*) FROM procrastinate_workers")) > 0

            await _wait_until("the worker", worker_ready, within=READY_TIMEOUT_S)
            await asyncio.sleep(min(3.0, window))  # start-up statements settle

            await obs.execute("SELECT pg_stat_statements_reset()")
            sent_before = await _db_queries_sent(metrics)
            await asyncio.sleep(window)
            idle_top, idle_all = await _statement_counts(obs, dbname, role)
            idle_sent = await _db_queries_sent(metrics) - sent_before
            _note(f"idle window {window:.1f} s: {idle_top} statements")

            await obs.execute("SELECT pg_stat_statements_reset()")
            sent_before = await _db_queries_sent(metrics)
            start = time.monotonic()
            async with _api_client(api_url) as client:
                presses = await _press(client, iter(parks))
            if presses.accepted != k:
                raise RuntimeError(f"expected {k} accepted presses, got {dict(presses.statuses)}")

            async def all_final() -> bool:
                row = await (
                    await obs.execute(
                        "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                        "count(*) FILTER (WHERE status IN ('failed', 'skipped')) FROM payouts"
                    )
                ).fetchone()
                assert row is not None
                if row[1]:
                    raise RuntimeError(f"{row[1]} payouts failed or skipped")
                return int(row[0]) == k

            await _wait_until(f"{k} succeeded payouts", all_final, within=60 + k)
            done = time.monotonic() - start
            if done < window:
                await asyncio.sleep(window - done)
            busy = max(window, done)
            total_top, total_all = await _statement_counts(obs, dbname, role)
            busy_sent = await _db_queries_sent(metrics) - sent_before
            top = await _top_statements(obs, dbname, role, k) if b.verbose else []
            timing = await (
                await obs.execute(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), "
                    "       percentile_cont(0.95) WITHIN GROUP (ORDER BY d), max(d) "
                    "FROM (SELECT extract(epoch FROM completed_at - created_at)::float8 AS d "
                    "      FROM payouts) t"
                )
            ).fetchone()
            assert timing is not None
        await b.stop_services()
    finally:
        await b.drop_db(url)

    background = idle_top * busy / window
    per_payout = (total_top - background) / k
    background_all = idle_all * busy / window
    details = [
        f"{k} payouts: accepted in {presses.seconds:.1f} s, all succeeded after {done:.1f} s "
        f"(created -> succeeded: p50 {timing[0]:.2f} s, p95 {timing[1]:.2f} s, "
        f"max {timing[2]:.2f} s); window {busy:.1f} s",
        f"total {total_top} top-level statements, background {background:.0f} "
        f"(idle {window:.1f} s: {idle_top}), (total - background) / {k} = {per_payout:.2f}",
        f"including statements nested in functions and triggers: "
        f"{(total_all - background_all) / k:.2f} per payout",
        f"as the processes count them (fleet_payouts_db_queries_total: with the pool's "
        f"connection checks, without BEGIN/COMMIT): "
        f"{(busy_sent - idle_sent * busy / window) / k:.2f} per payout",
    ]
    if top:
        details.append("top statements (calls, per payout, level, query):")
        details += [f"  {line}" for line in top]
    return Figure(
        2,
        "DB statements per instant payout",
        f"{per_payout:.2f} statements per payout (request to succeeded, top-level)",
        f"{background:.0f} background statements over the same {busy:.1f} s, subtracted",
        per_payout / 12,
        "measured / goal",
        "<= 12 per payout",
        per_payout <= 12,
        details,
    )


# --- periodic scan ---------------------------------------------------------------------


@dataclasses.dataclass
class ScanRun:
    seconds: float
    peak_bytes: int | None
    created: int


async def _due_parks_db(b: Bench, n: int, label: str) -> str:
    url = await b.create_db(label)
    async with await _connect(url) as conn:
        await conn.execute(
            "INSERT INTO parks (park_id, registered_at) "
            "SELECT 'due-' || g, now() - interval '30 days' FROM generate_series(1, %s) g",
            (n,),
        )
        await conn.execute("ANALYZE")
    return url


@contextlib.asynccontextmanager
async def _in_process(b: Bench, url: str) -> AsyncIterator[Deps]:
    pool = db.make_pool(url, name="bench", min_size=1, max_size=4)
    await pool.open(wait=True)
    billing = BillingClient(b.billing_url, token=None, timeout=30.0, budget=Budget(1000))
    try:
        async with queue_app.open_async(pool=pool):
            yield Deps(pool=pool, billing=billing, settings=b.settings(url))
    finally:
        await billing.aclose()
        await pool.close()


async def _measure(
    what: Callable[[], Awaitable[int]], *, trace: bool
) -> tuple[float, int | None, int]:
    before = 0
    if trace:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    try:
        created = await what()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - before if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    return seconds, peak, created


async def _scan_run(b: Bench, n: int, *, trace: bool) -> ScanRun:
    url = await _due_parks_db(b, n, "scan")
    try:
        async with _in_process(b, url) as deps:

            async def scan() -> int:
                return (await periodic.scan(deps)).created

            seconds, peak, created = await _measure(scan, trace=trace)
    finally:
        await b.drop_db(url)
    return ScanRun(seconds, peak, created)


async def _baseline_run(b: Bench, n: int, *, trace: bool) -> ScanRun:
    url = await _due_parks_db(b, n, "scanbase")
    try:
        async with _in_process(b, url) as deps:

            async def insert_and_defer() -> int:
                async with deps.pool.connection() as conn, conn.transaction():
                    rows = await db.fetch_all(
                        conn,
                        "INSERT INTO payouts (id, park_id, kind, max_amount) "
                        "SELECT gen_random_uuid(), park_id, 'periodic', %(max_amount)s "
                        "FROM parks WHERE periodic_payouts_enabled RETURNING id",
                        max_amount=deps.settings.payout_max_amount,
                    )
                    job_args: list[dict[str, JSONValue]] = [
                        {"payout_id": str(r["id"])} for r in rows
                    ]
                    deferrer = tasks.execute_payout.configure(connection=conn)
                    jobs = await deferrer.batch_defer_async(*job_args)
                return len(jobs)

            seconds, peak, created = await _measure(insert_and_defer, trace=trace)
    finally:
        await b.drop_db(url)
    return ScanRun(seconds, peak, created)


async def figure_periodic_scan(b: Bench) -> Figure:
    big = max(500, round(80_000 * b.scale))
    small = max(100, round(10_000 * b.scale))
    await b.reset_emulator()  # Billing knows none of these parks: no snapshots, same work
    scan = await _scan_run(b, big, trace=False)
    _note(f"scan of {big:,} parks: {scan.seconds:.2f} s, {scan.created:,} payouts")
    base = await _baseline_run(b, big, trace=False)
    _note(f"baseline for {big:,} parks: {base.seconds:.2f} s")
    mem_small = await _scan_run(b, small, trace=True)
    mem_big = await _scan_run(b, big, trace=True)
    mem_base = await _baseline_run(b, big, trace=True)
    assert mem_small.peak_bytes is not None and mem_big.peak_bytes is not None
    assert mem_base.peak_bytes is not None

    ratio = scan.seconds / base.seconds
    growth = mem_big.peak_bytes / max(1, mem_small.peak_bytes)
    flat = growth <= 1.5
    if small < 2 * periodic.BATCH:
        details_note = [f"(below {2 * periodic.BATCH:,} parks the memory comparison means little)"]
    else:
        details_note = []
    complete = scan.created == big and base.created == big
    details = [
        f"scan: {scan.created:,} payouts in {scan.seconds:.2f} s "
        f"({scan.created / scan.seconds:,.0f}/s); baseline: {base.created:,} in "
        f"{base.seconds:.2f} s ({base.created / base.seconds:,.0f}/s)",
        f"peak Python memory (tracemalloc, separate runs): scan {small:,} parks "
        f"{_mib(mem_small.peak_bytes)}, scan {big:,} parks {_mib(mem_big.peak_bytes)} "
        f"(x{growth:.2f} for x{big / small:.0f} parks: {'flat' if flat else 'NOT flat'}); "
        f"baseline {big:,} parks {_mib(mem_base.peak_bytes)}",
        f"time under tracemalloc: scan {mem_big.seconds:.2f} s, baseline {mem_base.seconds:.2f} s",
    ]
    details += details_note
    if not complete:
        details.append(f"INCOMPLETE: expected {big:,} payouts from each")
    return Figure(
        3,
        "periodic scan",
        f"{scan.seconds:.2f} s for {big:,} due parks, peak {_mib(mem_big.peak_bytes)}",
        f"{base.seconds:.2f} s (one INSERT ... SELECT + one batch_defer_async), "
        f"peak {_mib(mem_base.peak_bytes)}",
        ratio,
        "scan / baseline time",
        "ratio <= 2.0 and peak memory flat (80k/10k <= 1.5)",
        ratio <= 2.0 and flat and complete,
        details,
    )


# --- Billing calls per periodic payout -------------------------------------------------


async def figure_billing_calls(b: Bench) -> Figure:
    n = max(20, round(1000 * b.scale))
    url = await b.create_db("billing")
    parks = [f"bl-{i}" for i in range(1, n + 1)]
    dbname = _dbname(url)
    metrics_port = free_port()
    try:
        async with await _connect(url) as conn:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute(
                "INSERT INTO parks (park_id, registered_at) "
                "SELECT 'bl-' || g, now() - interval '1 day' FROM generate_series(1, %s) g",
                (n,),
            )
            role = str(await _scalar(conn, "SELECT current_user"))
        await b.reset_emulator()
        await b.set_balances(parks, "500.00")
        async with await _connect(await b.observer_url(url)) as obs:
            await obs.execute("SELECT pg_stat_statements_reset()")
            start = time.monotonic()
            worker = await b.worker(
                url,
                {
                    "PERIODIC_SCAN_CRON": "* * * * * *",  # every second
                    "PAYOUT_PERIOD_DAYS": "0.01",  # 14.4 min: due now, not again during the run
                },
                metrics_port=metrics_port,
            )

            async def all_final() -> bool:
                if not worker.alive:
                    raise RuntimeError(f"worker exited:\n{worker.tail()}")
                final = await _scalar(
                    obs,
                    "SELECT count(*) FROM payouts "
                    "WHERE kind = 'periodic' AND status IN ('succeeded', 'failed', 'skipped')",
                )
                return int(final) >= n

            await _wait_until(f"{n} final periodic payouts", all_final, within=120 + n / 5)
            took = time.monotonic() - start
            await asyncio.sleep(1.5)  # a scan or two more: they must cost Billing nothing
            by_status: dict[str, int] = dict(
                await (
                    await obs.execute("SELECT status, count(*) FROM payouts GROUP BY 1 ORDER BY 1")
                ).fetchall()
            )
            slowest = await _top_by_time(obs, dbname, role) if b.verbose else []
        stats = await b.emulator_stats()
        by_endpoint = await _billing_calls_by_endpoint(f"http://127.0.0.1:{metrics_port}/metrics")
        worker_cpu = worker.cpu_seconds()
        await b.stop(worker)
    finally:
        await b.drop_db(url)

    calls = int(stats["requests"])
    per_payout = calls / n
    ideal = (n + math.ceil(n / 1000)) / n  # one order each + one balances/select per 1,000
    return Figure(
        4,
        "billing calls per periodic payout",
        f"{per_payout:.3f} Billing calls per payout ({calls:,} calls, {n:,} parks)",
        f"{ideal:.3f} (ideal: one POST /v1/payouts each + one balances/select per 1,000)",
        per_payout / ideal,
        "measured / ideal",
        "<= 1.1 per payout",
        per_payout <= 1.1,
        [
            f"payouts by status: {by_status}; all final {took:.1f} s after the worker "
            f"started (scan every second); Billing max {stats['max_rps_1s']} requests/s",
            f"worker's Billing calls by endpoint/outcome: {by_endpoint}",
            f"worker CPU: {1000 * worker_cpu / n:.1f} ms per payout ({worker_cpu:.1f} s)",
            *(["top statements by time (worker, whole run):"] if slowest else []),
            *(f"  {line}" for line in slowest),
        ],
    )


# --- main ------------------------------------------------------------------------------

FigureFn = Callable[[Bench], Awaitable[Figure]]
FIGURES: list[tuple[int, str, str, FigureFn]] = [
    (1, "instant request throughput", "instant", figure_instant_throughput),
    (2, "DB statements per instant payout", "instant", figure_statements),
    (3, "periodic scan", "periodic", figure_periodic_scan),
    (4, "billing calls per periodic payout", "periodic", figure_billing_calls),
]


async def _run(
    server_url: str, server: str, workdir: Path, only: str | None, scale: float, verbose: bool
) -> tuple[int, list[Figure]]:
    bench = Bench(server_url, workdir, scale, verbose)
    figures: list[Figure] = []
    errors = 0
    print(
        f"fleet-payouts bench: scale {scale:g}, {server}, {os.cpu_count()} CPUs, "
        f"figures: {only or 'all'}",
        flush=True,
    )
    try:
        await bench.setup()
        for number, name, group, fn in FIGURES:
            if only is not None and group != only:
                continue
            print(f"\n== {number}. {name} ==", flush=True)
            started = time.monotonic()
            try:
                figure = await fn(bench)
            except Exception as exc:
                errors += 1
                traceback.print_exc()
                for child in bench.children:
                    print(f"--- {child.name} ---\n{child.tail()}")
                await bench.stop_services()
                figure = _error_figure(number, name, exc)
            print(figure.render(), flush=True)
            _note(f"{time.monotonic() - started:.0f} s")
            figures.append(figure)
    finally:
        await bench.close()
    return errors, figures


def _summary(figures: list[Figure]) -> str:
    lines = ["", "== summary =="]
    for f in figures:
        ratio = f"{f.ratio:6.2f}" if f.ratio is not None else "   n/a"
        lines.append(f"  {f.number}. {f.name:<36} ratio {ratio} ({f.ratio_label}); {f.verdict}")
    return "\n".join(lines)


def _scale(default: float) -> float:
    raw = os.environ.get("BENCH_SCALE")
    if raw is None or not raw.strip():
        return default
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"BENCH_SCALE must be a positive number, got {raw!r}")
    return value


@contextlib.contextmanager
def _server(workdir: Path) -> Iterator[tuple[str, str]]:
    given = os.environ.get("BENCH_DATABASE_URL", "").strip()
    if given:
        yield given, "PostgreSQL at BENCH_DATABASE_URL"
        return
    from fleet_payouts_devkit.postgres import EmbeddedPostgres

    durable = os.environ.get("BENCH_DURABLE") == "1"
    pg = EmbeddedPostgres(workdir / "pg", fast_unsafe=not durable)
    try:
        url = pg.start()
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        version = row[0] if row else "?"
        yield url, f"embedded PostgreSQL {version} (fsync {'on' if durable else 'off'})"
    finally:
        pg.stop()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(only: str | None, *, scale: float = 1.0) -> int:
    """Run the figures (all, or only the "instant" or "periodic" ones); 0 if all were measured.

    BENCH_SCALE, when set, overrides `scale`.
    """
    if only not in (None, "instant", "periodic"):
        print(f"bench: unknown figure group {only!r}", file=sys.stderr)
        return 2
    try:
        scale = _scale(scale)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    verbose = os.environ.get("BENCH_VERBOSE") == "1"
    fail_on_miss = os.environ.get("BENCH_FAIL_ON_MISS") == "1"
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-bench-"))
    workdir.chmod(0o755)  # the postgres account must reach the data dir when we are root
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    keep = True
    try:
        with _server(workdir) as (url, server):
            errors, figures = asyncio.run(_run(url, server, workdir, only, scale, verbose))
        print(_summary(figures), flush=True)
        keep = errors > 0
        if errors:
            return 1
        if fail_on_miss and any(f.passed is False for f in figures):
            return 1
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, cast(Any, previous))
        if keep:
            print(f"bench: logs kept in {workdir / 'logs'}", file=sys.stderr)
            shutil.rmtree(workdir / "pg", ignore_errors=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["instant", "periodic"], default=None)
    sys.exit(main(parser.parse_args().only))
