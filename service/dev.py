"""`fleet-payouts dev`: the whole system on one machine, with no set-up.

An embedded PostgreSQL (kept in ./.fleet-payouts/pg and reused) unless
DATABASE_URL is set, migrations, the Billing emulator with demo parks, the
API and one worker. Ctrl-C stops the children first, then the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx

from service import db, migrate, parks, roles

DATA_DIR = Path(".fleet-payouts")
# Dev-only tokens, printed in the help text; never used unless dev sets them.
DEV_API_TOKEN = "dev-api-token-change-me"  # noqa: S105

DEV_ADMIN_TOKEN = "dev-admin-token-change-me"  # noqa: S105
DEMO_PARKS = [
    # park_id, balance, instant payouts on
    ("park-alpha", Decimal("1500.00"), True),
    ("park-bravo", Decimal("250000.00"), True),
    ("park-charlie", Decimal("0.00"), True),
    ("park-delta", Decimal("820.50"), False),
]


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


@contextlib.contextmanager
def database() -> Iterator[tuple[str, str]]:
    """The URL migrate uses and the one the API and the worker log in with."""
    url = os.environ.get("DATABASE_URL")
    if url:
        say("using DATABASE_URL from the environment")
        yield url, url
        return
    from service.pgembed import EmbeddedPostgres

    pg = EmbeddedPostgres((DATA_DIR / "pg").resolve())
    say(f"starting embedded PostgreSQL in {DATA_DIR / 'pg'} ...")
    url = pg.start()
    try:
        # As in production: migrate as a superuser (it creates the roles), the
        # services as fleet_payouts_app, so dev meets the same privileges.
        yield url, pg.url_as(roles.ROLES.app)
    finally:
        say("stopping PostgreSQL")
        pg.stop()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


async def seed(url: str, billing_url: str) -> None:
    async with httpx.AsyncClient(base_url=billing_url) as client:
        for park_id, balance, _ in DEMO_PARKS:
            r = await client.put(
                f"/admin/balances/{park_id}", json={"available": str(balance), "currency": "RUB"}
            )
            r.raise_for_status()
    conn = await db.connect(url, name="dev")
    async with conn, conn.transaction():
        for park_id, _, instant in DEMO_PARKS:
            await parks.upsert(conn, park_id, instant=instant, periodic=True, params={"demo": True})


def run(*, port: int, billing_port: int) -> int:
    DATA_DIR.mkdir(exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with database() as (url, app_url):
        try:
            serve_all(url, app_url, port, billing_port, children, lambda: stopping)
        finally:
            # Children first: they need the database to shut down cleanly.
            stop(children)
    return 0


def serve_all(
    url: str,
    app_url: str,
    port: int,
    billing_port: int,
    children: list[subprocess.Popen[bytes]],
    stopping: Callable[[], bool],
) -> None:
    applied = asyncio.run(migrate.migrate(url))
    say(f"migrations applied: {len(applied)}")
    billing_url = f"http://127.0.0.1:{billing_port}"
    env = {
        **os.environ,
        "DATABASE_URL": app_url,
        "BILLING_URL": os.environ.get("BILLING_URL", billing_url),
        "API_TOKENS": os.environ.get("API_TOKENS", DEV_API_TOKEN),
        "ADMIN_TOKENS": os.environ.get("ADMIN_TOKENS", DEV_ADMIN_TOKEN),
        "PERIODIC_SCAN_CRON": os.environ.get("PERIODIC_SCAN_CRON", "* * * * *"),
    }

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        # Own session: Ctrl-C reaches only us, and we stop children in order.
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "service", *args], env=env, start_new_session=True
        )
        children.append(proc)
        return proc

    emulator = spawn("billing-emulator", "--port", str(billing_port))
    wait_http(f"{billing_url}/admin/stats", emulator)
    asyncio.run(seed(app_url, billing_url))
    api = spawn("serve", "--port", str(port))
    spawn("worker", "--concurrency", "4")
    wait_http(f"http://127.0.0.1:{port}/ping", api)
    print_help(port, billing_port, env)
    while not stopping() and all(c.poll() is None for c in children):
        time.sleep(0.2)
    if not stopping():
        say("a process exited on its own; stopping everything")


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.wait(timeout=70)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def print_help(port: int, billing_port: int, env: dict[str, str]) -> None:
    api = f"http://127.0.0.1:{port}"
    token = env["API_TOKENS"].split(",")[0]
    admin = env["ADMIN_TOKENS"].split(",")[0]
    print(
        f"""
fleet-payouts is running.
  API       {api}        (metrics: {api}/metrics)
  Billing   http://127.0.0.1:{billing_port}  (emulator)
  Demo parks: {", ".join(p for p, _, _ in DEMO_PARKS)}

Try:
  curl -s {api}/ping
  curl -s -X POST {api}/v1/payouts/instant \\
       -H 'Authorization: Bearer {token}' -H 'X-Park-Id: park-alpha' \\
       -H 'X-User-Id: user-1' -H 'Idempotency-Key: press-1' -d '{{"amount": "100.00"}}'
  curl -s {api}/v1/payouts -H 'Authorization: Bearer {token}' -H 'X-Park-Id: park-alpha'
  curl -s {api}/v1/payouts/instant/availability \\
       -H 'Authorization: Bearer {token}' -H 'X-Park-Id: park-alpha'
  curl -s -X PUT {api}/v1/parks/park-echo -H 'Authorization: Bearer {admin}' \\
       -H 'X-User-Id: admin-1' -d '{{"instant_payouts_enabled": true}}'
  curl -s '{api}/v1/audit?park_id=park-alpha' -H 'Authorization: Bearer {admin}'
  curl -s http://127.0.0.1:{billing_port}/admin/payouts

Ctrl-C stops everything.
""",
        flush=True,
    )
