"""The benchmark still runs end to end at a tiny scale (its numbers are not checked here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers.emulator import REPO_ROOT

FIGURES = (
    "instant request throughput",
    "DB statements per instant payout",
    "periodic scan",
    "billing calls per periodic payout",
)
TIMEOUT_S = 120


@pytest.mark.e2e
def test_bench_runs_every_figure() -> None:
    """`tests.bench.service.main(None, scale=0.02)` exits 0 and prints every figure's name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    code = "import sys; from tests.bench import service; sys.exit(service.main(None, scale=0.02))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the bench stop its PostgreSQL and children; then make sure.
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"bench did not finish in {TIMEOUT_S}s:\n{output}")
    assert 0 == proc.returncode, output
    for name in FIGURES:
        assert name in output, output
