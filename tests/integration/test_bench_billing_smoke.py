"""The Billing budget benchmark still runs end to end at a tiny scale (its figures are not
checked here: they are timing, and the suite shares its CPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.emulator import REPO_ROOT


@pytest.mark.e2e
def test_billing_bench_prints_its_figures(pg_server_url: str) -> None:
    """`python -m tests.bench.billing --rps 20 --seconds 2` exits 0 and prints both figures."""
    env = {**os.environ, "BENCH_DATABASE_URL": pg_server_url}
    r = subprocess.run(
        [sys.executable, "-m", "tests.bench.billing", "--rps", "20", "--seconds", "2"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == r.returncode, r.stdout + r.stderr
    for figure in ("peak one-second calls / limit", "achieved rate / limit"):
        assert figure in r.stdout, r.stdout
