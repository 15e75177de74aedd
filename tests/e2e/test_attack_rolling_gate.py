"""Issue 21's gate across a rolling deploy, attacked from outside: a worker of the previous
release (tag pre-wave3, its own tree) and one of this release drain one backlog against one
Billing budget, real processes and the real emulator over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow

from tests.conftest import service_env
from tests.e2e.test_instant_first import made, queue_periodic_backlog
from tests.helpers.api import press, register, set_balance
from tests.helpers.emulator import REPO_ROOT, billing_requests, peak_in_one_second
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

# The release before this one (tagged pre-wave3 here): a commit of main's own history.
OLD_TAG = "4d9b39f7458354c0ff1baa52b2e48ebfed033499"


def old_release(into: Path) -> Path:
    """The tree of tag pre-wave3, extracted beside the test."""
    into.mkdir()
    found = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", OLD_TAG], check=False, capture_output=True
    )
    if found.returncode != 0:
        pytest.skip(f"no commit {OLD_TAG} in this clone: {found.stderr.decode()[:200]}")
    archive = found.stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@pytest.mark.parametrize("rps", [10, 100])
def test_old_and_new_workers_share_one_budget_and_neither_starves(
    db_url: str, billing_url: str, pg: psycopg.Connection[DictRow], tmp_path: Any, rps: int
) -> None:
    """With a pre-wave3 worker and this release's worker draining one backlog at BILLING_RPS
    and three presses made meanwhile (urgent claims), no second holds more than
    BILLING_RPS + 1 calls at Billing, every press is paid, and each worker pays a share."""
    backlog = 6 * rps
    queue_periodic_backlog(pg, billing_url, backlog)
    old = old_release(tmp_path / "old")
    env = service_env(db_url, billing_url, BILLING_RPS=str(rps))
    with cluster(env, tmp_path) as c:
        api = c.api()
        pressed = [f"press-{i}" for i in range(3)]
        for park in pressed:
            register(api, park, periodic=False, status=201)
            set_balance(billing_url, park, "100.00")
        c.worker(concurrency=15)
        log = (tmp_path / "old-worker.log").open("wb")
        old_worker = subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--concurrency", "15"],
            env={**env, "PYTHONPATH": str(old)},
            cwd=old,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: len(made(billing_url)) >= rps, timeout=60, what="the drain")
            # Presses while both drain: urgent claims reserve slots the old worker ignores.
            keys = {press(api, park)["id"] for park in pressed}
            wait_for(
                lambda: len(made(billing_url)) >= backlog + len(pressed),
                timeout=60,
                interval=0.2,
                what="the backlog to drain",
            )
        finally:
            old_worker.terminate()
            old_worker.wait(timeout=30)
            log.close()
    requests = billing_requests(billing_url)
    orders = [r for r in requests if r["method"] == "POST" and r["path"] == "/v1/payouts"]
    old_log = (tmp_path / "old-worker.log").read_text()
    new_log = (tmp_path / "worker-0.log").read_text()
    paid = {"old": old_log.count(" succeeded"), "new": new_log.count(" succeeded")}
    print(paid)
    assert keys <= {p["idempotency_key"] for p in made(billing_url)}
    assert backlog + len(pressed) == len(orders)
    assert peak_in_one_second(r["at"] for r in requests) <= rps + 1
    assert "Traceback" not in old_log, old_log[-3000:]
    assert "Traceback" not in new_log, new_log[-3000:]
    assert min(paid.values()) >= backlog // 5, paid
