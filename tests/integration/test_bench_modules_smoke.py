"""The events, Billing budget, HTTP client and history benchmarks still run end to end at a tiny
scale, on the suite's server (their figures are not checked here: they are timing, and the
suite shares its CPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.emulator import REPO_ROOT

BENCHES = {
    "park_import": (["--parks", "200"], ("parks import, 200 new parks", "baseline")),
    "events": (["--scale", "0.01"], ("reader throughput", "outbox cost per instant press")),
    "feed": (
        ["--seconds", "1", "--rate", "20"],
        ("before dump-restore", "after restore into a fresh cluster", "feed p99"),
    ),
    "http_client": (["--posts", "20"], ("ms CPU per POST",)),
    "history": (
        ["--scale", "2000", "--repeat", "2"],
        ("fill:", "database size", "gauge: jobs by status", "audit verify", "history bench:"),
    ),
    "worker_profile": (
        ["--payouts", "40", "--workers", "2", "--no-spy"],
        (
            "worker CPU:",
            "wall time over the drain",
            "gate claims, all 2 worker(s)",
            "statements during the drain",
        ),
    ),
    # Every configuration of `make bench`: each default budget, --concurrency 100 at the last
    # one, and the unbudgeted baseline.
    "billing": (
        ["--seconds", "0.05", "--press-backlog", "200", "--presses", "3"],
        (
            "peak one-second calls / limit",
            "achieved rate / limit",
            "baseline, no budget",
            "DB connections per worker",
            "round trips per payout",
            "worker CPU per payout",
            "achieved / CPU-bound rate",
            "its wall time (schedstat)",
            "three workers, 1,000/s budget",
            "press to Billing, with backlog",
            "baseline, no backlog",
        ),
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_bench_prints_every_figure(pg_server_url: str, bench: str) -> None:
    """`python -m tests.bench.<bench>` at a tiny scale exits 0 and prints each of its figures."""
    args, figures = BENCHES[bench]
    env = {**os.environ, "BENCH_DATABASE_URL": pg_server_url}
    r = subprocess.run(
        [sys.executable, "-m", f"tests.bench.{bench}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert 0 == r.returncode, r.stdout + r.stderr
    for figure in figures:
        assert figure in r.stdout, r.stdout
