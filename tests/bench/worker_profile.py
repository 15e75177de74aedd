"""Profile one worker draining periodic payouts, on pinned cores: where its CPU goes,
what it waits on, and which statements it sends.

    python -m tests.bench.worker_profile [--payouts 3000] [--rps 1000] [--concurrency 10]
        [--worker-core 1] [--other-core 0] [--spy out.txt] [--no-spy]

The worker runs alone on one core (`taskset`); PostgreSQL, the Billing emulator, py-spy
and this bench share the other, so the worker's CPU time is its own. One periodic scan
(its own database role, left out of the statement counts) queues --payouts payouts with
a balance snapshot; the worker drains them at BILLING_RPS=--rps. Prints:

1. the worker's CPU per payout split by component (py-spy `--nonblocking`, on-CPU
   samples only, i.e. without `--idle`, each sample's innermost frame's package; the
   shares times the process's own CPU time per payout): procrastinate, psycopg (with
   its cost per statement), aiohttp (per POST), the gate, our execution code,
   logging/metrics, the asyncio loop;
2. its wall time split: on CPU, runnable but waiting for its core (/proc/PID/schedstat),
   asleep; and, from probes the child installs around procrastinate's fetch loop, the
   gate, Billing's POST and every statement, what the serial fetch loop and a job wait on;
3. its statements by kind (pg_stat_statements in the bench's PostgreSQL): procrastinate's,
   the gate's claims (and how many of them lost, i.e. took no slot), ours.

Needs Linux, taskset, and py-spy for the first table (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

# -- the child: a worker with wall-time probes ------------------------------------------

_WALL: dict[str, float] = collections.defaultdict(float)
_CALLS: collections.Counter[str] = collections.Counter()


def _timed(label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = label(*args, **kwargs) if callable(label) else label
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            _WALL[name] += time.perf_counter() - start
            _CALLS[name] += 1

    return wrapper


def _statement_kind(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> str:
    text = query if isinstance(query, str) else str(getattr(query, "_obj", query))
    if "procrastinate" in text:
        return "statement: procrastinate"
    if "billing_gate" in text:
        return "statement: gate"
    return "statement: ours"


def _wait_kind(*aws: Any) -> str:
    first = aws[0] if aws else None
    name = getattr(first.get_coro(), "__qualname__", "") if isinstance(first, asyncio.Task) else ""
    return "fetch loop: waits for a free job slot" if "acquire" in name else "fetch loop: idle"


def _install_probes(dump: Path) -> None:
    """Time (wall) procrastinate's fetch loop, the gate, Billing's POST and statements."""
    from procrastinate import manager, worker

    from service.billing import client, gate
    from service.core import db

    manager.JobManager.fetch_job = _timed(  # type: ignore[method-assign]
        "fetch loop: fetch_job", manager.JobManager.fetch_job
    )
    manager.JobManager.finish_job = _timed(  # type: ignore[method-assign]
        "job: procrastinate finish_job", manager.JobManager.finish_job
    )
    worker.utils.wait_any = _timed(_wait_kind, worker.utils.wait_any)  # type: ignore[attr-defined]
    worker.Worker._process_job = _timed(  # type: ignore[method-assign]
        "job: whole (process_job)", worker.Worker._process_job
    )
    gate.SharedGate.acquire = _timed(  # type: ignore[method-assign]
        "job: gate acquire (waits for a slot)", gate.SharedGate.acquire
    )
    gate.SharedGate._claim = _timed("gate: claim", gate.SharedGate._claim)  # type: ignore[method-assign]
    client.BillingClient._send = _timed(  # type: ignore[method-assign]
        "job: Billing POST (HTTP)", client.BillingClient._send
    )
    db.CountingCursor.execute = _timed(  # type: ignore[method-assign]
        _statement_kind, db.CountingCursor.execute
    )

    fetch_as = db.fetch_as
    claim = gate.Q["claim_slots"]

    async def counted(conn: Any, cls: Any, query: Any, **params: Any) -> Any:
        row = await fetch_as(conn, cls, query, **params)
        if query is claim and row is not None:
            _CALLS["gate: claim that took no slot" if not row.slots else "gate: claim won"] += 1
        return row

    gate.db.fetch_as = counted  # type: ignore[attr-defined]

    def write() -> None:
        dump.write_text(
            json.dumps(
                {k: [_WALL.get(k, 0.0), _CALLS[k]] for k in {*_WALL, *_CALLS}},
                indent=1,
                sort_keys=True,
            )
        )

    atexit.register(write)


def _child(dump: str, argv: list[str]) -> None:
    _install_probes(Path(dump))
    from service.cli import main

    main(argv)


# -- the bench ---------------------------------------------------------------------------

BUCKETS = (
    ("procrastinate", ("procrastinate/",)),
    ("psycopg (+ pool)", ("psycopg/", "psycopg_pool/", "psycopg_binary/")),
    ("aiohttp (+ yarl, multidict)", ("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/")),
    ("the gate (service/billing/gate.py)", ("service/billing/gate.py",)),
    ("our execution code (service/)", ("service/",)),
    (
        "logging / metrics",
        ("logging/", "prometheus_client/", "structlog/", "json/", "sentry_sdk/"),
    ),
    (
        "asyncio loop (+ selectors, socket, ssl)",
        ("asyncio/", "selectors.py", "socket.py", "uvloop/", "contextvars", "ssl.py"),
    ),
    ("the probes (this file)", ("worker_profile.py",)),
)


def bucket(frame: str) -> str:
    where = frame.rpartition("(")[2].rstrip(")")
    for name, needles in BUCKETS:
        if any(n in where for n in needles):
            return name
    return "other: " + where.split("site-packages/")[-1].split(":")[0].split("/")[0]


def caller(frames: list[str]) -> str:
    """Who a psycopg sample works for: the outermost procrastinate / gate / service frame."""
    for frame in reversed(frames):
        where = frame.rpartition("(")[2]
        if "procrastinate/" in where:
            return "procrastinate"
        if "service/billing/gate.py" in where:
            return "the gate"
        if "service/" in where and "service/core/db.py" not in where:
            return "ours"
    return "other"


def spy_table(collapsed: Path, cpu_ms: float, statements: float, posts: float) -> list[str]:
    by: collections.Counter[str] = collections.Counter()
    pg_for: collections.Counter[str] = collections.Counter()
    total = polled = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith("EpollSelector.select"):
            # A thread woken from epoll_wait is runnable ("active" to py-spy) until its
            # core is free, still on this frame: on a shared core that is mostly waiting
            # for the core, not CPU. Left out of the split; counted apart.
            polled += n
            continue
        total += n
        b = bucket(frames[-1])
        by[b] += n
        if b.startswith("psycopg"):
            pg_for[caller(frames)] += n
    if not total:
        return ["py-spy: no samples"]
    out = [
        f"  py-spy: {polled} of {polled + total} active samples in EpollSelector.select "
        "(woken, waiting for the core) left out; the process's CPU split over the rest",
        f"  {'component (self time of the innermost frame)':48} {'ms/payout':>9} {'share':>6}",
    ]
    for name, n in by.most_common():
        out.append(f"  {name:48} {cpu_ms * n / total:9.3f} {100 * n / total:5.1f}%")
    pg_ms = cpu_ms * sum(n for k, n in by.items() if k.startswith("psycopg")) / total
    http_ms = cpu_ms * sum(n for k, n in by.items() if k.startswith("aiohttp")) / total
    out.append(
        f"  psycopg {pg_ms / max(statements, 1e-9):.3f} ms per statement ({statements:.2f} "
        f"statements per payout); aiohttp {http_ms / max(posts, 1e-9):.3f} ms per POST"
    )
    out.append(
        f"  ({total} on-CPU samples) psycopg's time by whom it works for (other: resumed "
        "from the loop, no caller on the stack):"
    )
    for name, n in pg_for.most_common():
        out.append(f"    {name:46} {cpu_ms * n / total:9.3f} {100 * n / total:5.1f}%")
    return out


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds on CPU and seconds runnable but waiting for a core, of every thread."""
    on = wait = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "schedstat").read_text().split()
        on += int(fields[0]) / 1e9
        wait += int(fields[1]) / 1e9
    return on, wait


STATEMENTS = """
SELECT s.query, s.calls, s.rows FROM pg_stat_statements s
JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid
WHERE s.toplevel AND r.rolname <> 'fp_profile_fill' AND d.datname = current_database()
ORDER BY s.calls DESC
"""


def kind(query: str) -> str:
    q = " ".join(query.split())
    if "billing_gate" in q:
        return "gate"
    if "procrastinate" in q:
        for name in ("fetch_job", "finish_job", "update_heartbeat", "listen", "notify"):
            if name in q.lower():
                return f"procrastinate {name}"
        return "procrastinate other"
    if q.upper() in ("BEGIN", "COMMIT", "ROLLBACK") or q.upper().startswith("SAVEPOINT"):
        return f"ours: {q.split()[0].upper()}"
    return "ours"


def spy_program() -> str:
    """py-spy on PATH or beside this Python, else ''."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else "")


def bench_free_port() -> Callable[[], int]:
    """The port picker _ports_from installed (PostgreSQL's and the emulator's ports)."""
    from tests.bench import service

    picker: Callable[[], int] = getattr(service, "free_port")  # noqa: B009  (patched)
    return picker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payouts", type=int, default=3000)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--workers", type=int, default=1, help="more workers (the first one is profiled)"
    )
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--worker-core", type=int, default=cores[-1])
    parser.add_argument("--other-core", type=int, default=cores[0])
    parser.add_argument("--spy", help="keep py-spy's collapsed stacks here")
    parser.add_argument("--no-spy", action="store_true", help="no py-spy (waits and counts)")
    parser.add_argument("--statements", type=int, default=12, help="top statements printed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        _child(args.child, rest)
        return 0
    ports = os.environ.get("PROFILE_PORTS", "")
    if ports:
        from tests.bench.press_profile import _ports_from
        from tests.helpers import emulator

        first, _, last = ports.partition("-")
        _ports_from(int(first), int(last))
        emulator.free_port = bench_free_port()
    if not args.no_spy and not spy_program():
        print("py-spy not found: `pip install py-spy`, or --no-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-worker-profile-"))
    workdir.chmod(0o755)
    args.all_cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    # PostgreSQL, the emulator and their children inherit the other core.
    os.sched_setaffinity(0, {args.other_core})
    try:
        run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, workdir: Path) -> None:
    from service.core.settings import load as load_settings
    from service.ops import migrate
    from tests.bench.billing import NEVER, add_due_parks, cpu_seconds, fill_queue, final_count
    from tests.bench.common import bench_server
    from tests.conftest import create_database, drop_database, service_env
    from tests.helpers.emulator import REPO_ROOT, billing_requests, run_emulator
    from tests.helpers.procs import wait_for

    n = args.payouts
    with bench_server(workdir) as server_url, run_emulator() as billing_url:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute("DROP ROLE IF EXISTS fp_profile_fill")
            conn.execute("CREATE ROLE fp_profile_fill SUPERUSER LOGIN PASSWORD 'fill'")
        url = create_database(server_url, template=None)
        asyncio.run(migrate.migrate(url))
        # The scan and this bench's own queries run as a role of their own, so the
        # statement counts below are the worker's alone.
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        fill_url = parts._replace(netloc=f"fp_profile_fill:fill@{host}").geturl()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        add_due_parks(url, billing_url, n)
        env = service_env(
            url,
            billing_url,
            BILLING_RPS=f"{args.rps:g}",
            PERIODIC_SCAN_CRON=NEVER,
            LOG_LEVEL="INFO",
        )
        probes = [workdir / f"probes-{i}.json" for i in range(args.workers)]
        logs = [(workdir / f"worker-{i}.log").open("wb") for i in range(args.workers)]
        # The first worker is the one profiled, on its core; any others on every core.
        workers = [
            subprocess.Popen(
                [
                    shutil.which("taskset") or "taskset",
                    "-c",
                    str(args.worker_core) if i == 0 else args.all_cores,
                    sys.executable,
                    "-m",
                    "tests.bench.worker_profile",
                    "--child",
                    str(probe),
                    "worker",
                    "--concurrency",
                    str(args.concurrency),
                ],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for i, (probe, log) in enumerate(zip(probes, logs, strict=True))
        ]
        worker = workers[0]
        try:

            def registered() -> bool:
                with psycopg.connect(fill_url) as conn:
                    row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
                return row is not None and row[0] == len(workers)

            wait_for(registered, timeout=60, interval=0.1, what="the workers to register")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
            spy = None
            if not args.no_spy:
                spy_out = Path(args.spy) if args.spy else workdir / "spy.txt"
                spy = subprocess.Popen(
                    [
                        spy_program(),
                        "record",
                        "--nonblocking",
                        "-r",
                        "200",
                        "-f",
                        "raw",
                        "-o",
                        str(spy_out),
                        "-p",
                        str(worker.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            cpu_before = cpu_seconds(worker.pid)
            on_before, wait_before = schedstat(worker.pid)
            started = time.monotonic()
            settings = load_settings({**env, "DATABASE_URL": fill_url})
            asyncio.run(fill_queue(settings, n))
            wait_for(
                lambda: final_count(fill_url) >= n or any(w.poll() is not None for w in workers),
                timeout=60 + 3 * n / min(args.rps, 300),
                interval=0.05,
                what=f"{n} payouts to finish",
            )
            wall = time.monotonic() - started
            cpu = cpu_seconds(worker.pid) - cpu_before
            on, runnable = (
                a - b for a, b in zip(schedstat(worker.pid), (on_before, wait_before), strict=True)
            )
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
                spy.wait(timeout=60)
            with psycopg.connect(url) as conn:
                statements = conn.execute(STATEMENTS).fetchall()
        finally:
            for w in workers:
                w.terminate()
            for w, log in zip(workers, logs, strict=True):
                try:
                    w.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
                log.close()
        posts = sorted(r["at"] for r in billing_requests(billing_url) if r["method"] == "POST")
        drain = posts[-1] - posts[0] if len(posts) > 1 else wall
        drop_database(server_url, url)

    cpu_ms = 1000 * cpu / n
    rate = n / drain
    print(
        f"one worker on core {args.worker_core}, --concurrency {args.concurrency}, "
        f"BILLING_RPS={args.rps:g}: {n} payouts, {len(posts)} POSTs in {drain:.2f} s = "
        f"{rate:.0f} payouts/s; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"worker CPU: {cpu_ms:.3f} ms per payout (CPU-bound rate {1000 / cpu_ms:.0f}/s; "
        f"achieved / CPU-bound {rate * cpu_ms / 1000:.2f})"
    )
    print("\n1. worker CPU per payout, by component")
    if spy is not None:
        sent = sum(calls for _, calls, _ in statements) / n
        print("\n".join(spy_table(spy_out, cpu_ms, sent, len(posts) / n)))
    else:
        print("  (--no-spy)")
    print(
        f"\n2. wall time over the drain ({wall:.2f} s from the scan's start): on CPU "
        f"{on:.2f} s ({100 * on / wall:.0f}%), runnable but waiting for its core "
        f"{runnable:.2f} s ({100 * runnable / wall:.0f}%), asleep (waiting on I/O or timers) "
        f"{wall - on - runnable:.2f} s ({100 * (wall - on - runnable) / wall:.0f}%)"
    )
    if probes[0].exists():
        found = json.loads(probes[0].read_text())
        label = "probe (wall, summed over concurrent calls)"
        if args.workers > 1:
            label = "probe, first worker (wall, summed)"
        print(f"  {label:48} {'calls':>7} {'s':>7} {'ms/call':>8}")
        for name, (secs, calls) in sorted(found.items()):
            print(f"  {name:48} {calls:7d} {secs:7.2f} {1000 * secs / max(1, calls):8.3f}")
        jobs = found.get("job: whole (process_job)", [0.0, 0])
        if jobs[1]:
            print(
                f"  jobs in flight on average: {jobs[0] / drain:.1f} of {args.concurrency} "
                f"(Little: job wall {1000 * jobs[0] / jobs[1]:.2f} ms x "
                f"{jobs[1] / drain:.0f}/s)"
            )
        claims: collections.Counter[str] = collections.Counter()
        for probe in probes:
            if probe.exists():
                for name, (_, calls) in json.loads(probe.read_text()).items():
                    if name.startswith("gate: claim "):
                        claims[name] += calls
        lost = claims["gate: claim that took no slot"]
        print(
            f"  gate claims, all {args.workers} worker(s): {claims['gate: claim won']} took "
            f"slots, {lost} took none = {lost / n:.2f} per payout"
        )
    else:
        print("  (no probe dump: the worker did not exit cleanly)")
    print("\n3. statements during the drain (pg_stat_statements, the scan's role left out)")
    kinds: collections.Counter[str] = collections.Counter()
    rows_by: collections.Counter[str] = collections.Counter()
    for query, calls, rows in statements:
        kinds[kind(query)] += calls
        rows_by[kind(query)] += rows
    total = sum(kinds.values())
    for name, calls in kinds.most_common():
        print(f"  {name:40} {calls:7d} = {calls / n:5.2f} per payout  (rows {rows_by[name]})")
    print(f"  {'all':40} {total:7d} = {total / n:5.2f} per payout")
    print("  top statements:")
    for query, calls, rows in statements[: args.statements]:
        print(f"  {calls:7d} {rows:7d}  {' '.join(query.split())[:110]}")


if __name__ == "__main__":
    sys.exit(main())
