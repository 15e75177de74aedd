"""Run the Billing emulator as a real subprocess, as the service meets it in production.

A subprocess (rather than an in-process app) means the tests go through real sockets,
real timeouts and a real SIGTERM, which is what the fault injection is about.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fleet_payouts_devkit.emulator import RateStats
from fleet_payouts_devkit.processes import free_port as free_port  # the tests take it from here
from fleet_payouts_devkit.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 3


class EmulatorStartError(RuntimeError):
    """The emulator did not answer in time, or exited before answering."""


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """Inherit our environment, minus a stray BILLING_TOKEN, plus ``env`` on top.

    A BILLING_TOKEN exported in a developer's shell would otherwise silently turn on
    auth and fail every test that did not ask for it.
    """
    child = {k: v for k, v in os.environ.items() if k != "BILLING_TOKEN"}
    path = child.get("PYTHONPATH")
    child["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    child.update(env or {})
    return child


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    """Poll ``/admin/stats`` until it answers, the process dies, or the deadline passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=1.0) as client:
        while True:
            if proc.poll() is not None:
                raise EmulatorStartError(
                    f"emulator exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
                )
            try:
                if client.get("/admin/stats").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise EmulatorStartError(
                    f"emulator not ready after {START_TIMEOUT_S}s:\n"
                    f"{log.read_text(errors='replace')}"
                )
            time.sleep(0.02)  # poll interval, not synchronisation


@contextlib.contextmanager
def run_emulator(port: int | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the emulator on ``port`` (a free one if None) and yield its base URL.

    When the port was picked for us and another process grabbed it first, we retry with
    a new one. The process is stopped with SIGTERM (then SIGKILL) on exit.
    """
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    with tempfile.TemporaryDirectory(prefix="billing-emulator-") as tmp:
        log = Path(tmp) / "output.log"
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            base_url = f"http://127.0.0.1:{chosen}"
            cmd = [
                sys.executable,
                "-m",
                "fleet_payouts_devkit.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(chosen),
            ]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    cmd, cwd=REPO_ROOT, env=_child_env(env), stdout=out, stderr=subprocess.STDOUT
                )
            try:
                try:
                    _wait_ready(proc, base_url, log)
                except EmulatorStartError:
                    if attempt + 1 < attempts and proc.poll() is not None:
                        continue  # most likely lost the port race: try another port
                    raise
                yield base_url
                return
            finally:
                stop_process(proc, STOP_TIMEOUT_S)


def billing_requests(base_url: str) -> list[dict[str, Any]]:
    """The emulator's log of contract requests: arrival (its monotonic clock), path, status."""
    r = httpx.get(f"{base_url}/admin/requests", timeout=10)
    r.raise_for_status()
    logged: list[dict[str, Any]] = r.json()["requests"]
    return logged


def peak_in_one_second(times: Iterable[float]) -> int:
    """The most events in any one-second window, counted as the emulator counts max_rps_1s."""
    stats = RateStats()
    for t in sorted(times):
        stats.record(t)
    return stats.max_rps_1s
