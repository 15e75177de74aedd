"""`fleet-payouts parks import` at scale: `python -m tests.bench.park_import [--parks N,M]`.

For each size N, on a fresh migrated database, runs the real command (a child process)
three times on generated files and prints its wall time and peak memory (the child's
max RSS):

1. N new parks (every one registered, each with its chained audit entry), goal <= 10 s
   at 80,000 and <= 120 s at 1,000,000;
2. the same file again (nothing changes, no entry written);
3. every park's flags changed (N updates, N entries).

Baseline: the same file's rows COPYed into a bare table (the floor of any import).
Memory is flat when the peak at the largest N is about the peak at the smallest.
Issue 17 measured 18.5 s for 30,000 and 216 s for 90,000 before (quadratic).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from service.ops import migrate
from tests.bench.common import bench_server

REPO_ROOT = Path(__file__).resolve().parents[2]
GOALS = {80_000: 10.0, 1_000_000: 120.0}


def say(message: str) -> None:
    print(message, flush=True)


def _with_db(url: str, name: str) -> str:
    p = conninfo_to_dict(url)
    password = f":{p['password']}" if p.get("password") else ""
    user = p.get("user") or "postgres"
    return f"postgresql://{user}{password}@{p.get('host')}:{p.get('port')}/{name}"


def write_csv(path: Path, parks: int, *, flipped: bool) -> None:
    instant, periodic = ("false", "true") if flipped else ("true", "false")
    with path.open("w") as f:
        f.write("park_id,instant_payouts_enabled,periodic_payouts_enabled\n")
        for i in range(parks):
            f.write(f"bench-park-{i:07d},{instant},{periodic}\n")


def run_import(url: str, path: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of one `fleet-payouts parks import`."""
    env = {**os.environ, "DATABASE_URL": url}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "parks", "import", str(path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}): {err.decode()}")
    return seconds, usage.ru_maxrss / 1024, out.decode().strip()


def baseline_copy(url: str, path: Path) -> float:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TEMP TABLE floor (park_id text, instant bool, periodic bool)")
        started = time.perf_counter()
        with (
            conn.cursor().copy("COPY floor FROM STDIN (FORMAT csv, HEADER true)") as copy,
            path.open("rb") as f,
        ):
            while block := f.read(1 << 20):
                copy.write(block)
        return time.perf_counter() - started


def entries(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM audit_log").fetchone()
        return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parks", default="80000,1000000", help="comma-separated sizes")
    args = parser.parse_args()
    sizes = [int(n) for n in args.parks.split(",")]
    peaks: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="fp-bench-import-") as tmp:
        # The embedded PostgreSQL runs as its own account: it must traverse the directory.
        os.chmod(tmp, 0o711)  # noqa: S103
        with bench_server(Path(tmp)) as server:
            for n in sizes:
                one_size(server, Path(tmp), n, peaks)
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        say(
            f"peak memory: {peaks[low]:.0f} MiB at {low:,}, {peaks[high]:.0f} MiB at {high:,} "
            "(flat when alike)"
        )


def one_size(server: str, tmp: Path, n: int, peaks: dict[int, float]) -> None:
    name = f"fp_bench_import_{os.getpid()}_{n}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(server, name)
    try:
        asyncio.run(migrate.migrate(url))
        new, flipped = tmp / f"new-{n}.csv", tmp / f"flipped-{n}.csv"
        write_csv(new, n, flipped=False)
        write_csv(flipped, n, flipped=True)
        floor = baseline_copy(url, new)
        fresh, peak1, _ = run_import(url, new)
        after_fresh = entries(url)
        again, peak2, _ = run_import(url, new)
        unchanged = entries(url) - after_fresh
        update, peak3, _ = run_import(url, flipped)
        updated = entries(url) - after_fresh - unchanged
        peaks[n] = max(peak1, peak2, peak3)
        goal = GOALS.get(n)
        verdict = (
            ""
            if goal is None
            else f" (goal <= {goal:.0f} s: " + ("met)" if fresh <= goal else "MISSED)")
        )
        say(
            f"parks import, {n:,} new parks: {fresh:.1f} s{verdict}; "
            f"{after_fresh:,} audit entries; peak memory {peak1:.0f} MiB"
        )
        say(f"parks import, {n:,} unchanged: {again:.1f} s; {unchanged} entries written")
        say(f"parks import, {n:,} updated: {update:.1f} s; {updated:,} entries")
        say(
            f"baseline: COPY of the same {n:,} rows into a bare table: {floor:.2f} s "
            f"(import / COPY: {fresh / floor:.0f}x)"
        )
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
