"""The audit log at scale: `python -m tests.bench.audit [--scale N] [--months M]`.

Loads N generated entries (default 1,000,000) over M monthly partitions (default 24),
with valid hash chains (8 per month), then prints three figures, each with its goal
and a baseline measured in the same run:

1. p95 latency of one park's latest 50 entries through the GET /v1/audit query
   (service.audit.store.page), goal <= 20 ms; baseline: a `SELECT 1` round trip.
2. chained inserts per second with 3 concurrent writers (each insert its own
   transaction), goal >= 500; baselines: the same inserts into a copy of the table
   without the chain, and into one with a single chain that every writer locks until it
   commits (the hot row the 64 chains avoid).
3. `fleet-payouts audit verify --full`: entries per second and peak memory (RSS of the
   process); baselines: streaming the same rows without hashing, and the peak memory of
   verifying only the last two months (flat memory means the two are alike); then the
   incremental run (plain `audit verify`) once the full one has recorded the closed months.

The issue's figure is `--scale 10000000`. For 100 million: `--scale 100000000` needs
about 60 GB of disk and an hour or two to load here; figures 1 and 2 depend on a month's
size only through index depth, figure 3's time grows linearly and its memory not at all.

The entries are written straight into standalone monthly tables (COPY) and ATTACHed,
with chains computed here by service.audit.chain's own functions: going through the
trigger would take hours at 10 M. Figure 3 checks them all, so a generator that got a
link wrong would show as a failed verify, not as a fast one.

Runs on an embedded PostgreSQL with fsync on (commits cost what they cost in
production: figure 2 is about who waits for whose commit) unless `--database-url`
names a server whose user may create databases; `--fast-unsafe` turns fsync off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from service.audit import chain as audit_chain
from service.audit import store as audit
from service.core import db
from service.ops import migrate

REPO_ROOT = Path(__file__).resolve().parents[2]
PARKS = 80_000
STRIPES = 8
WRITERS = 3
PAGE = 50
QUERIES = 400
# How long the second insert measurement keeps each transaction open after its insert:
# the rest of a press's work, the COMMIT round trip, a synchronous standby's answer.
HOLD_MS = 2.0
ACTIONS = (
    ("payout.instant.request", 0.55),
    ("payout.succeeded", 0.3),
    ("payout.skipped", 0.08),
    ("park.update", 0.05),
    ("payout.failed", 0.02),
)
OUTCOMES = ("ok",) * 8 + ("cooldown_active", "payout_in_progress")
COLUMNS = (
    "id, at, actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details, "
    "chain_stripe, chain_seq, chain_hash"
)
TYPES = ["int8", "timestamptz", "text", "text", "text", "text", "text", "text", "uuid"]
TYPES += ["jsonb", "int2", "int8", "bytea"]


def say(message: str) -> None:
    print(message, flush=True)


def months_before(this: date, n: int) -> list[date]:
    index = this.year * 12 + this.month - 1
    return [date((index - k) // 12, (index - k) % 12 + 1, 1) for k in range(n, 0, -1)]


def _with_db(url: str, name: str) -> str:
    p = conninfo_to_dict(url)
    return f"postgresql://{p.get('user') or 'postgres'}@{p.get('host')}:{p.get('port')}/{name}"


@contextlib.contextmanager
def server(given: str | None, fast_unsafe: bool) -> Iterator[str]:
    if given:
        yield given
        return
    from fleet_payouts_devkit.postgres import temporary_server

    with temporary_server("fp-bench-audit-", fast_unsafe=fast_unsafe) as url:
        yield url


# --- loading ---------------------------------------------------------------------------


def _as_is(text: str) -> str:
    """The details are JSON text already, in the form jsonb prints."""
    return text


def generate(
    month: date, count: int, first_id: int, rng: random.Random
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One month's entries in time order, linked into STRIPES chains; and the heads."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    span = (audit_chain.next_month(month) - month).total_seconds()
    offsets = sorted(rng.random() * span for _ in range(count))
    prev = [audit_chain.genesis(month, s) for s in range(STRIPES)]
    seqs = [0] * STRIPES
    firsts: list[int | None] = [None] * STRIPES
    lasts = [0] * STRIPES
    actions = [a for a, _ in ACTIONS]
    weights = [w for _, w in ACTIONS]
    rows = []
    for i, offset in enumerate(offsets):
        entry_id = first_id + i
        at = start + timedelta(microseconds=int(offset * 1_000_000))
        park = rng.randrange(PARKS)
        action = rng.choices(actions, weights)[0]
        system = action in ("payout.succeeded", "payout.skipped", "payout.failed")
        actor_type, actor_id = ("system", "worker") if system else ("user", f"user-{park}-1")
        outcome = "ok" if system else rng.choice(OUTCOMES)
        request_id = None if system else uuid.UUID(int=rng.getrandbits(128)).hex
        payout_id = uuid.UUID(int=rng.getrandbits(128)) if outcome == "ok" else None
        # Written as jsonb prints it (keys by length, then bytes), which is what is hashed.
        details = f'{{"key": "k-{entry_id}", "amount": "{rng.randrange(100, 99999)}.00"}}'
        stripe = rng.randrange(STRIPES)
        seqs[stripe] += 1
        park_id = f"park-{park:05d}"
        content = audit_chain.canonical(
            entry_id, at, actor_type, actor_id, park_id, action, outcome, request_id,
            payout_id, details, stripe, seqs[stripe],
        )  # fmt: skip
        link = hashlib.sha256(prev[stripe] + content).digest()
        prev[stripe] = link
        firsts[stripe] = firsts[stripe] or entry_id
        lasts[stripe] = entry_id
        rows.append(
            (entry_id, at, actor_type, actor_id, park_id, action, outcome, request_id,
             payout_id, Jsonb(details, dumps=_as_is), stripe, seqs[stripe], link)
        )  # fmt: skip
    heads = [(month, s, seqs[s], prev[s], firsts[s], lasts[s]) for s in range(STRIPES) if seqs[s]]
    return rows, heads


def load(url: str, months: list[date], total: int, rng: random.Random) -> None:
    per_month = total // len(months)
    next_id = 1
    with psycopg.connect(url, autocommit=True) as conn:
        for month in months:
            rows, heads = generate(month, per_month, next_id, rng)
            next_id += len(rows)
            name = f"audit_log_{month:%Y_%m}"
            end = audit_chain.next_month(month)
            conn.execute(
                f"CREATE TABLE {name} (LIKE audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            with conn.cursor().copy(f"COPY {name} ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(TYPES)
                for row in rows:
                    cp.write_row(row)
            conn.execute(
                f"ALTER TABLE audit_log ATTACH PARTITION {name} "
                f"FOR VALUES FROM ('{month}') TO ('{end}')"
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO audit_chain_heads "
                    "(month, stripe, last_seq, last_hash, first_id, last_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    heads,
                )
        conn.execute("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), %s)", (next_id,))
        conn.execute("ANALYZE audit_log")


# --- figure 1: one park's latest entries -------------------------------------------------


def p95(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


async def figure_latency(url: str, rng: random.Random) -> tuple[float, float]:
    conn = await db.connect(url, name="bench")
    async with conn:
        baseline, latency = [], []
        for _ in range(QUERIES):
            t = time.perf_counter()
            await conn.execute("SELECT 1")
            baseline.append(time.perf_counter() - t)
        filters = [
            audit.Filters(park_id=f"park-{rng.randrange(PARKS):05d}") for _ in range(QUERIES)
        ]
        await audit.page(conn, filters[0], limit=PAGE + 1, after=None)  # warm the plan cache
        for f in filters:
            t = time.perf_counter()
            rows = await audit.page(conn, f, limit=PAGE + 1, after=None)
            latency.append(time.perf_counter() - t)
            assert len(rows) <= PAGE + 1
    return p95(latency) * 1000, p95(baseline) * 1000


# --- figure 2: inserts with three writers ------------------------------------------------

# The design the 64 chains replace, on the same table: one chain whose head every writer
# locks until it commits. Created disabled; the measurements switch triggers on and off
# so that all of them insert into the same partitioned table with the same indexes.
ONE_CHAIN = """
CREATE TABLE bench_one_head (id int PRIMARY KEY, seq bigint NOT NULL, last_hash bytea NOT NULL);
INSERT INTO bench_one_head VALUES (1, 0, sha256(''));
CREATE FUNCTION bench_one_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE head record;
BEGIN
    SELECT seq, last_hash INTO head FROM bench_one_head WHERE id = 1 FOR UPDATE;
    NEW.chain_stripe := 0;
    NEW.chain_seq := head.seq + 1;
    NEW.chain_hash := sha256(head.last_hash || audit_log_canonical(
        NEW.id, NEW.at, NEW.actor_type, NEW.actor_id, NEW.park_id, NEW.action, NEW.outcome,
        NEW.request_id, NEW.payout_id, NEW.details, NEW.chain_stripe, NEW.chain_seq));
    UPDATE bench_one_head SET seq = NEW.chain_seq, last_hash = NEW.chain_hash WHERE id = 1;
    RETURN NEW;
END $$;
CREATE TRIGGER zz_bench_one_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION bench_one_chain();
ALTER TABLE audit_log DISABLE TRIGGER zz_bench_one_chain;
"""
# Which chain trigger each variant runs with: (ours, the single chain's).
VARIANTS = {"chained": (True, False), "unchained": (False, False), "one_chain": (False, True)}


def inserts_per_second(url: str, seconds: float, hold_ms: float = 0) -> float:
    """Rows per second that WRITERS connections insert, one transaction each, which goes on
    for `hold_ms` after its insert."""
    counts = [0] * WRITERS
    start = threading.Barrier(WRITERS + 1)
    stop = threading.Event()
    failures: list[BaseException] = []
    statement = (
        "INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, details) "
        "VALUES ('user', %s, %s, 'payout.instant.request', 'ok', %s)"
    )

    def writer(n: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as c:
                start.wait()
                while not stop.is_set():
                    with c.transaction():
                        c.execute(statement, (f"user-{n}", f"park-{n}", '{"k": 1}'))
                        if hold_ms:
                            c.execute("SELECT pg_sleep(%s)", (hold_ms / 1000,))
                    counts[n] += 1
        except BaseException as exc:
            failures.append(exc)
            stop.set()
            start.abort()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return sum(counts) / (time.perf_counter() - began)


def use_variant(url: str, variant: str) -> None:
    ours, single = VARIANTS[variant]
    with psycopg.connect(url, autocommit=True) as conn:
        for trigger, on in (
            ("zz_audit_log_chain", ours),
            ("zz_audit_log_chain_heads", ours),
            ("zz_bench_one_chain", single),
        ):
            state = "ENABLE ALWAYS" if on else "DISABLE"
            conn.execute(f"ALTER TABLE audit_log {state} TRIGGER {trigger}")


def figure_inserts(url: str, seconds: float) -> dict[str, float]:
    """Each variant measured twice, interleaved, so that a change in the machine's load
    (other processes on these cores) weighs on all of them alike; the mean of the two."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ONE_CHAIN)
    rates: dict[str, list[float]] = {}
    try:
        for _ in range(2):
            for variant in VARIANTS:
                use_variant(url, variant)
                rates.setdefault(variant, []).append(inserts_per_second(url, seconds / 2))
            for variant in ("chained", "one_chain"):
                use_variant(url, variant)
                rates.setdefault(f"{variant}_held", []).append(
                    inserts_per_second(url, seconds / 2, HOLD_MS)
                )
    finally:
        use_variant(url, "chained")
    return {name: statistics.mean(values) for name, values in rates.items()}


# --- figure 3: audit verify ----------------------------------------------------------------


# Runs `body` in a child and reports its own memory high-water mark (VmHWM) on stderr:
# the children's ru_maxrss would count this process's pages, copied at fork.
MEASURED = """
import sys
try:
    {body}
finally:
    with open("/proc/self/status") as status:
        print(next(line for line in status if line.startswith("VmHWM:")), file=sys.stderr)
"""
VERIFY = "from service.cli import main; main(sys.argv[1:])"


def run_measured(body: str, args: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """Exit code, seconds, peak memory in bytes and output of one child process."""
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED.format(body=body), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - began
    hwm = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM:")]
    if not hwm:
        raise RuntimeError(f"no VmHWM from the child:\n{proc.stderr}")
    return proc.returncode, seconds, int(hwm[-1].split()[1]) * 1024, proc.stdout


async def stream_rate(url: str, months: list[date]) -> float:
    """Rows per second read the way the verifier reads them, without hashing."""
    conn = await db.connect(url, name="bench")
    n = 0
    began = time.perf_counter()
    async with conn:
        for month in months:
            async with (
                conn.transaction(),
                contextlib.aclosing(audit_chain.month_entries(conn, month)) as stream,
            ):
                async for _ in stream:
                    n += 1
    return n / (time.perf_counter() - began)


def figure_verify(url: str, months: list[date], entries: int) -> dict[str, float]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(REPO_ROOT)}
    code, seconds, rss, output = run_measured(VERIFY, ["audit", "verify", "--full"], env)
    if code != 0:
        raise RuntimeError(f"audit verify exited {code}:\n{output}")
    # The full walk recorded every closed month: the daily run walks only the current one.
    code, incremental, _, output = run_measured(VERIFY, ["audit", "verify"], env)
    if code != 0:
        raise RuntimeError(f"audit verify (incremental) exited {code}:\n{output}")
    since = str(months[-2])
    _, _, rss_two, _ = run_measured(VERIFY, ["audit", "verify", "--full", "--since", since], env)
    _, _, rss_bare, _ = run_measured("import service.cli, service.audit.chain, psycopg", [], env)
    streamed = asyncio.run(stream_rate(url, months))
    return {
        "rate": entries / seconds,
        "seconds": seconds,
        "incremental": incremental,
        "rss": rss,
        "rss_two": rss_two,
        "rss_bare": rss_bare,
        "streamed": streamed,
    }


# --- main ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.audit", description=__doc__)
    parser.add_argument("--scale", type=int, default=1_000_000, help="entries to load")
    parser.add_argument("--months", type=int, default=24, help="monthly partitions to fill")
    parser.add_argument("--seconds", type=float, default=5.0, help="per insert measurement")
    parser.add_argument("--database-url", default=None, help="a server to create a database on")
    parser.add_argument("--fast-unsafe", action="store_true", help="embedded server, fsync off")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)
    rng = random.Random(20261130)
    with server(args.database_url, args.fast_unsafe) as server_url:
        name = f"fp_bench_audit_{os.getpid()}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = _with_db(server_url, name)
        try:
            return run(url, args, rng)
        finally:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(url: str, args: argparse.Namespace, rng: random.Random) -> int:
    asyncio.run(migrate.migrate(url))
    now = datetime.now(UTC)
    months = months_before(date(now.year, now.month, 1), args.months)
    began = time.perf_counter()
    load(url, months, args.scale, rng)
    entries = args.scale // args.months * args.months
    say(
        f"audit bench: {entries:,} entries over {args.months} monthly partitions "
        f"({entries // args.months:,} a month, {PARKS:,} parks, {STRIPES} chains a month), "
        f"loaded in {time.perf_counter() - began:.0f} s"
    )
    results: list[bool] = []

    latency, round_trip = asyncio.run(figure_latency(url, rng))
    results.append(latency <= 20)
    say(
        f"[1] one park's latest {PAGE} entries (GET /v1/audit query): p95 {latency:.2f} ms "
        f"(goal <= 20 ms: {verdict(results[-1])}); baseline SELECT 1 p95 {round_trip:.2f} ms, "
        f"x{latency / round_trip:.1f}"
    )

    # Verify first: the insert figure leaves entries of the single-chain and unchained
    # variants in the current month, which verify would rightly call broken.
    v = figure_verify(url, months, entries)
    i = figure_inserts(url, args.seconds)
    results.append(i["chained"] >= 500)
    say(
        f"[2] chained inserts with {WRITERS} writers: {i['chained']:,.0f}/s (goal >= 500: "
        f"{verdict(results[-1])}); baseline unchained {i['unchained']:,.0f}/s, ratio "
        f"{i['chained'] / i['unchained']:.2f}; one chain that every writer locks "
        f"{i['one_chain']:,.0f}/s. With each transaction open {HOLD_MS:g} ms after its insert: "
        f"64 chains {i['chained_held']:,.0f}/s, one chain {i['one_chain_held']:,.0f}/s "
        f"(x{i['chained_held'] / i['one_chain_held']:.1f})"
    )

    say(
        f"[3] audit verify: {v['rate']:,.0f} entries/s ({entries:,} in {v['seconds']:.1f} s), "
        f"peak memory {mib(v['rss'])}; baseline streaming without hashing "
        f"{v['streamed']:,.0f} rows/s, ratio {v['rate'] / v['streamed']:.2f}; peak memory for "
        f"the last 2 months only {mib(v['rss_two'])} (ratio {v['rss'] / v['rss_two']:.2f}), "
        f"interpreter and imports alone {mib(v['rss_bare'])}. Incremental (the daily run: "
        f"closed months recorded, heads unchanged): {v['incremental']:.1f} s, "
        f"x{v['seconds'] / v['incremental']:.0f} faster than --full"
    )
    if args.fail_on_miss and not all(results):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
