"""The events benchmark still runs end to end at a tiny scale (its numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.emulator import REPO_ROOT

FIGURES = ("reader throughput", "outbox cost per instant press")


@pytest.mark.e2e
def test_events_bench_prints_every_figure(pg_server_url: str) -> None:
    """The events bench at scale 0.01 on the suite's server exits 0 and prints every figure."""
    env = {**os.environ, "BENCH_DATABASE_URL": pg_server_url}
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.events", "--scale", "0.01"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    for name in FIGURES:
        assert name in result.stdout, result.stdout
