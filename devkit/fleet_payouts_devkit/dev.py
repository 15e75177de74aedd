"""`fleet-payouts dev`: the whole system on one machine, with no set-up.

An embedded PostgreSQL (kept in ./.fleet-payouts/pg and reused) unless
DATABASE_URL is set, migrations, the Billing emulator with demo parks, the
API and one worker. Ctrl-C stops the children first, then the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx

from fleet_payouts_devkit.processes import port_is_free, stop_process, wait_until
from service.core import db
from service.ops import migrate, roles
from service.parks import store as parks

DATA_DIR = Path(".fleet-payouts")
# Dev-only tokens, printed in the help text; never used unless dev sets them.
DEV_API_TOKEN = "dev-api-token-change-me"  # noqa: S105

DEV_ADMIN_TOKEN = "dev-admin-token-change-me"  # noqa: S105
# Signs the dev console's sessions; dev only, like the tokens above.
DEV_CONSOLE_SECRET = "dev-console-secret-change-me-0123456789"  # noqa: S105
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
    from fleet_payouts_devkit.postgres import EmbeddedPostgres

    data = data_dir()
    pg = EmbeddedPostgres(data)
    say(f"starting embedded PostgreSQL in {data} ...")
    url = pg.start()
    try:
        # As in production: migrate as a superuser (it creates the roles), the
        # services as fleet_payouts_app, so dev meets the same privileges.
        yield url, pg.url_as(roles.ROLES.app)
    finally:
        say("stopping PostgreSQL")
        pg.stop()


def data_dir() -> Path:
    """./.fleet-payouts/pg, or, for root in a folder the postgres account cannot
    reach (a mode-0700 home), a folder of its own under /var/tmp."""
    from fleet_payouts_devkit.postgres import reachable_by_server

    local = (DATA_DIR / "pg").resolve()
    if reachable_by_server(local):
        return local
    digest = hashlib.sha256(str(local).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"fleet-payouts-{digest}" / "pg"  # noqa: S108 - owned, 0700


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when dev dies, even by SIGKILL, so no
    orphan keeps the ports the next dev needs (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_port_free(port: int, timeout: float = 30.0) -> None:
    """A killed dev's children stop on their own; give them the time to let go of a port."""
    try:
        wait_until(lambda: port_is_free(port), timeout=timeout, what=f"port {port} to be free")
    except TimeoutError:
        raise RuntimeError(f"port {port} is still in use; pick another with --port") from None


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
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
        "CONSOLE_SECRET": os.environ.get("CONSOLE_SECRET", DEV_CONSOLE_SECRET),
    }

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        # Own session: Ctrl-C reaches only us, and we stop children in order.
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "service", *args],
            env=env,
            start_new_session=True,
            # Safe here: dev starts no threads of its own before its children.
            preexec_fn=_die_with_parent,
        )
        children.append(proc)
        return proc

    # Beside the API's port, and never the emulator's (`--billing-port` may be port + 2).
    worker_metrics = next(p for p in (port + 2, port + 3) if p != billing_port)
    for taken in (billing_port, port, worker_metrics):
        wait_port_free(taken)
    emulator = spawn("billing-emulator", "--port", str(billing_port))
    wait_http(f"{billing_url}/admin/stats", emulator)
    asyncio.run(seed(app_url, billing_url))
    api = spawn("serve", "--port", str(port))
    spawn("worker", "--concurrency", "4", "--metrics-port", str(worker_metrics))
    wait_http(f"http://127.0.0.1:{port}/ping", api)
    print_help(port, billing_port, worker_metrics, env)
    while not stopping() and all(c.poll() is None for c in children):
        time.sleep(0.2)
    if not stopping():
        say("a process exited on its own; stopping everything")


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    # Newest first: the worker and the API before the emulator they talk to.
    for child in reversed(children):
        stop_process(child, timeout=70)


def print_help(port: int, billing_port: int, worker_metrics: int, env: dict[str, str]) -> None:
    api = f"http://127.0.0.1:{port}"
    token = env["API_TOKENS"].split(",")[0]
    admin = env["ADMIN_TOKENS"].split(",")[0]
    print(
        f"""
fleet-payouts is running.
  API       {api}        (metrics: {api}/metrics)
  Console   {api}/console   sign in with any user id (say support-1) and the admin token
            {admin}
  Worker    metrics: http://127.0.0.1:{worker_metrics}/metrics
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
  # a manual payout: admin-1 asks, another admin (admin-2) approves
  curl -s -X POST {api}/v1/admin/payouts -H 'Authorization: Bearer {admin}' \
       -H 'X-User-Id: admin-1' -H 'Idempotency-Key: manual-1' \
       -d '{{"park_id": "park-alpha", "amount": "25.00", "reason": "goodwill"}}'
  curl -s -X POST {api}/v1/admin/payouts/$PAYOUT_ID/approve \
       -H 'Authorization: Bearer {admin}' -H 'X-User-Id: admin-2'
  # a fee on instant payouts, and what a press would cost now
  curl -s -X PUT {api}/v1/parks/park-alpha -H 'Authorization: Bearer {admin}' \
       -H 'X-User-Id: admin-1' -d '{{"instant_fee": {{"percent": "1.00", "fixed": "0.00"}}}}'
  curl -s '{api}/v1/payouts/instant/quote?amount=100.00' \
       -H 'Authorization: Bearer {token}' -H 'X-Park-Id: park-alpha'
  curl -s http://127.0.0.1:{billing_port}/admin/payouts

Ctrl-C stops everything.
""",
        flush=True,
    )
