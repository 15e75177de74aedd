"""`fleet-payouts dev`: the whole system from nothing, one payout through it, a clean Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_payouts_devkit.dev import DEV_API_TOKEN
from fleet_payouts_devkit.processes import free_port

from tests.helpers.procs import wait_for

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 90.0
PAYOUT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# Variables that would point dev at something other than its own embedded pieces.
FOREIGN_ENV = ("DATABASE_URL", "BILLING_URL", "BILLING_TOKEN", "API_TOKENS", "ADMIN_TOKENS")
FOREIGN_PREFIXES = ("PAYOUT_", "INSTANT_", "PERIODIC_", "SENTRY_", "BILLING_")


def leftovers(workdir: Path, ports: tuple[int, ...]) -> list[str]:
    """`ps` lines of processes whose command line mentions our temp dir or our ports."""
    pattern = re.compile(
        "|".join([re.escape(str(workdir)), *(rf"--(?:billing-)?port[= ]{p}\b" for p in ports)])
    )
    out = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    me = os.getpid()
    found = []
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if int(pid) != me and pattern.search(args) and not args.startswith("ps "):
            found.append(line.strip())
    return found


def kill_leftovers(workdir: Path, ports: tuple[int, ...]) -> None:
    """Last-resort cleanup of the processes this test started, by pid."""
    for line in leftovers(workdir, ports):
        pid = int(line.split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Under /tmp and world-traversable: the embedded PostgreSQL runs as `postgres`.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-dev-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_dev_pays_a_demo_park_and_stops_cleanly_on_ctrl_c(workdir: Path) -> None:
    """dev pays park-alpha with no set-up and exits 0 on SIGINT, leaving no process behind."""
    port, billing_port = free_port(), free_port()
    while billing_port == port:
        billing_port = free_port()
    ports = (port, billing_port)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in FOREIGN_ENV and not k.startswith(FOREIGN_PREFIXES)
    }
    log_path = workdir / "dev.log"
    api = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "dev",
                "--port",
                str(port),
                "--billing-port",
                str(billing_port),
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])

    try:

        def up_or_dead() -> bool:
            return proc.poll() is not None or (
                200 == httpx.get(f"{api}/ping", timeout=1).status_code
            )

        try:
            wait_for(up_or_dead, timeout=START_TIMEOUT_S, interval=0.2, what=f"dev API on {api}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{tail()}") from None
        assert proc.poll() is None, f"dev exited with {proc.returncode}:\n{tail()}"

        headers = {
            "Authorization": f"Bearer {DEV_API_TOKEN}",
            "X-Park-Id": "park-alpha",
            "X-User-Id": "user-1",
        }
        r = httpx.post(
            f"{api}/v1/payouts/instant",
            json={"amount": "100.00"},
            headers={**headers, "Idempotency-Key": f"press-{uuid.uuid4()}"},
            timeout=10,
        )
        assert 202 == r.status_code, r.text
        payout_id = r.json()["id"]

        def final_payout() -> dict[str, object] | None:
            body = httpx.get(f"{api}/v1/payouts/{payout_id}", headers=headers, timeout=5).json()
            return body if body["status"] not in ("pending", "processing") else None

        payout = wait_for(
            final_payout, timeout=PAYOUT_TIMEOUT_S, interval=0.2, what="the payout to finish"
        )
        assert ("succeeded", "100.00", "RUB") == (
            payout["status"],
            payout["amount"],
            payout["currency"],
        ), f"{payout}\n{tail()}"
        executed = httpx.get(f"http://127.0.0.1:{billing_port}/admin/payouts", timeout=5).json()
        assert [payout_id] == [p["idempotency_key"] for p in executed["payouts"]]

        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"dev still running {STOP_TIMEOUT_S}s after SIGINT:\n{tail()}"
            ) from None
        assert 0 == code, tail()
        try:
            wait_for(
                lambda: not leftovers(workdir, ports), timeout=10, what="dev's children to exit"
            )
        except AssertionError:
            raise AssertionError(
                "left running after dev exited:\n"
                + "\n".join(leftovers(workdir, ports))
                + f"\n{tail()}"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(workdir, ports)
