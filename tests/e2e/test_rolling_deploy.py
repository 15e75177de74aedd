"""Issue 16's changes attacked from outside (attack16): a rolling deploy, the release before
(tag pre-wave3, unpacked by git archive) running its API and worker beside this one's on the
same database, Billing and webhook consumer."""

from __future__ import annotations

import collections
import io
import itertools
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import service_env
from tests.e2e.test_events import SECRET, Consumer
from tests.helpers.api import (
    admin_headers,
    get_payout,
    park_headers,
    periodic_payouts,
    press,
    press_headers,
    register,
    set_balance,
    spacing_violations,
    wait_final,
)
from tests.helpers.emulator import REPO_ROOT, free_port
from tests.helpers.events import stored
from tests.helpers.procs import Cluster, Proc, cluster, wait_for

pytestmark = pytest.mark.e2e

# The release production ran before this one (tagged pre-wave3 here): a commit of main's
# own history, so any full clone of main has it, tags or not.
OLD_TAG = "4d9b39f7458354c0ff1baa52b2e48ebfed033499"
PERIOD = timedelta(seconds=3)


# --- the release before, beside this one ----------------------------------------------


def _has_tag(tag: str) -> bool:
    found = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
        capture_output=True,
    )
    return found.returncode == 0


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release before's service/, sql/ and migrations/, unpacked from git (no worktree)."""
    if not _has_tag(OLD_TAG):
        pytest.skip(f"tag {OLD_TAG} not in this clone")
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "archive",
            "--format=tar",
            OLD_TAG,
            "service",
            "sql",
            "migrations",
        ],
        capture_output=True,
        check=True,
    ).stdout
    root = tmp_path_factory.mktemp("old-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


class OldProc(Proc):
    """A `python -m service ...` child of the release before: its own code first on the path."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, root: Path) -> None:
        self.args = args
        self.log = log
        self._terminated = False
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env={**env, "PYTHONPATH": str(root)},
            cwd=root,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def old_api(c: Cluster, root: Path) -> str:
    """An API process of the release before, answering /ping."""
    from fleet_payouts_devkit.processes import free_port

    port = free_port()
    proc = OldProc(["serve", "--port", str(port)], c.env, c.log_dir / f"old-api-{port}.log", root)
    c.procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: proc.alive() and httpx.get(f"{url}/ping", timeout=1).status_code == 200,
        what=f"old API on {url}",
    )
    return url


def old_worker(c: Cluster, root: Path) -> Proc:
    proc = OldProc(["worker", "--concurrency", "10"], c.env, c.log_dir / "old-worker.log", root)
    c.procs.append(proc)
    return proc


def server_errors(c: Cluster) -> list[str]:
    """Lines of every process's log that tell of a 500, a traceback or a job that failed."""
    bad = []
    for proc in c.procs:
        for line in proc.log.read_text(errors="replace").splitlines():
            if '" 500' in line or "Traceback" in line or "Unknown task" in line:
                bad.append(f"{proc.log.name}: {line}")
    return bad


def request_manual(api: str, park: str, amount: str) -> dict[str, Any]:
    headers = {**admin_headers("admin-1"), "Idempotency-Key": uuid.uuid4().hex}
    body = {"park_id": park, "amount": amount, "reason": "rolling deploy"}
    r = httpx.post(f"{api}/v1/admin/payouts", json=body, headers=headers, timeout=10)
    assert 202 == r.status_code or 201 == r.status_code, r.text
    payout: dict[str, Any] = r.json()
    return payout


def approve(api: str, payout_id: str) -> None:
    r = httpx.post(
        f"{api}/v1/admin/payouts/{payout_id}/approve", headers=admin_headers("admin-2"), timeout=10
    )
    assert r.status_code < 300, r.text


def events_of(apis: list[str], park: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every event of the park, read from the start in pages of `limit`, each page through
    the next of `apis` in turn (the cursor one API issued is followed on the other)."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    for page in itertools.count():
        api = apis[page % len(apis)]
        params = {"limit": str(limit), **({"after": cursor} if cursor else {})}
        r = httpx.get(f"{api}/v1/events", params=params, headers=park_headers(park), timeout=10)
        assert 200 == r.status_code, r.text
        body = r.json()
        out.extend(body["events"])
        cursor = body.get("next_cursor")
        if not body["events"] or not cursor:
            break
    return out


@pytest.fixture
def hooks() -> Iterator[Consumer]:
    """A webhook consumer checking signatures (test_events'), stopped at the end."""
    c = Consumer(free_port())
    try:
        yield c
    finally:
        c.stop()


def admin_list(apis: list[str], path: str, items: str, limit: int) -> list[dict[str, Any]]:
    """An admin list read whole in pages of `limit`, each through the next of `apis` in turn."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    for page in itertools.count():
        query = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        r = httpx.get(
            f"{apis[page % len(apis)]}{path}", params=query, headers=admin_headers(), timeout=10
        )
        assert 200 == r.status_code, r.text
        out.extend(r.json()[items])
        cursor = r.json()["next_cursor"]
        if not cursor:
            return out
    raise AssertionError("unreachable")


def test_rolling_deploy_old_and_new_side_by_side(
    old_release: Path, db_url: str, billing_url: str, tmp_path: Path, hooks: Consumer
) -> None:
    """With the release before's API and worker beside this one's on one database, every press,
    manual payout and periodic payout is paid exactly once, a cancel holds, each API reads what the
    other wrote, and no process logs a 500, a traceback or an unknown task."""
    env = service_env(
        db_url,
        billing_url,
        PAYOUT_PERIOD_DAYS=str(PERIOD.total_seconds() / 86400),
        PERIODIC_SCAN_CRON="* * * * * */1",
        INSTANT_COOLDOWN_HOURS="0",
        WEBHOOK_URL=f"http://127.0.0.1:{hooks.port}/hooks",
        WEBHOOK_SECRET=SECRET,
    )
    hooks.start()
    pressed = [f"roll-press-{i}" for i in range(6)]
    periodic = [f"roll-periodic-{i}" for i in range(6)]
    manual = [f"roll-manual-{i}" for i in range(2)]
    with (
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as pg,
        cluster(env, tmp_path) as c,
    ):
        new = c.api()
        old = old_api(c, old_release)
        apis = [new, old]
        for i, park in enumerate(pressed):
            register(apis[i % 2], park, instant=True, periodic=False)
            set_balance(billing_url, park, "1000.00")
        for i, park in enumerate(manual):
            register(apis[i % 2], park, instant=False, periodic=False)
            set_balance(billing_url, park, "1000.00")
        for i, park in enumerate(periodic):
            register(apis[i % 2], park, instant=False, periodic=True)
            set_balance(billing_url, park, "100.00")
        pg.execute(
            "UPDATE parks SET registered_at = now() - interval '1 hour' WHERE park_id = ANY(%s)",
            (periodic,),
        )
        # A payout pressed before any worker runs stays pending: cancelled through the other API.
        cancelled = press(old, pressed[0], "10.00")
        r = httpx.post(
            f"{new}/v1/payouts/{cancelled['id']}/cancel",
            headers={**park_headers(pressed[0]), "X-User-Id": "u1"},
            timeout=10,
        )
        assert (200, "cancelled") == (r.status_code, r.json()["status"]), r.text
        c.worker()
        old_worker(c, old_release)
        # Deliveries start with what commits once a worker has switched webhooks on.
        wait_for(
            lambda: pg.execute("SELECT 1 FROM webhook_feed").fetchone(),
            timeout=60,
            what="a worker to switch webhooks on",
        )
        before = pg.execute("SELECT coalesce(max(seq), 0) AS seq FROM events").fetchone()
        assert before is not None
        made: list[tuple[str, str]] = []
        for i, park in enumerate(pressed):
            # Pressed on one version, retried (same key and body) through the other: a replay.
            headers = press_headers(park, user=f"user-of-{park}", key=uuid.uuid4().hex)
            answers = [
                httpx.post(
                    f"{api}/v1/payouts/instant",
                    json={"amount": "50.00"},
                    headers=headers,
                    timeout=10,
                )
                for api in (apis[i % 2], apis[(i + 1) % 2])
            ]
            assert [202, 200] == [a.status_code for a in answers], [a.text for a in answers]
            assert answers[0].json()["id"] == answers[1].json()["id"]
            made.append((park, answers[0].json()["id"]))
        for i, park in enumerate(manual):
            requested = request_manual(apis[i % 2], park, "7.00")
            approve(apis[(i + 1) % 2], requested["id"])
            made.append((park, requested["id"]))
        for i, (park, payout_id) in enumerate(made):
            final = wait_final(apis[i % 2], park, payout_id)
            assert "succeeded" == final["status"], final
            assert final == get_payout(apis[(i + 1) % 2], park, payout_id)
        wait_for(
            lambda: all(len(v) >= 2 for v in periodic_payouts(pg, periodic).values()),
            timeout=60,
            what="two periodic payouts for every park",
        )
        assert "cancelled" == get_payout(new, pressed[0], cancelled["id"])["status"]
        # The bank sends back one payout each version made; whichever reader holds the lease
        # applies both, once.
        sent_back = made[:2]
        for _, payout_id in sent_back:
            httpx.post(
                f"{billing_url}/admin/payouts/{payout_id}/return", json={"code": "account_closed"}
            ).raise_for_status()
        wait_for(
            lambda: all(
                get_payout(apis[i % 2], park, payout_id)["return_code"] == "account_closed"
                for i, (park, payout_id) in enumerate(sent_back)
            ),
            timeout=60,
            what="both returns to be applied",
        )

        # Billing paid each payout once, under its own key.
        paid = httpx.get(f"{billing_url}/admin/payouts", timeout=10).json()
        keys = collections.Counter(p["idempotency_key"] for p in paid["payouts"])
        assert [] == [k for k, n in keys.items() if n > 1]
        for park, payouts in periodic_payouts(pg, periodic).items():
            assert [] == spacing_violations(payouts, PERIOD), park
        # Both versions read each other's events.
        for park in pressed[:2]:
            every = events_of([new], park)
            assert every == events_of([old], park)
            assert every == events_of([new, old], park, limit=1)
            assert every == events_of([old, new], park, limit=1)
        ours = {e["id"] for e in stored(pg) if e["seq"] > before["seq"]}
        wait_for(
            lambda: ours <= {e["id"] for e in hooks.first_seen()},
            timeout=60,
            what="every event to reach the webhook consumer",
        )
        assert 0 == hooks.bad_signatures
        delivered = {e["id"]: e for e in hooks.first_seen()}
        for park in pressed[:2]:
            feed = [e for e in events_of([new], park) if e["id"] in ours]
            assert feed == [delivered[e["id"]] for e in feed]
        # The admin lists (built by core/listing now) page across versions alike, once
        # nothing adds to them: periodic payouts off, none in flight.
        pg.execute("UPDATE parks SET periodic_payouts_enabled = false")
        wait_for(
            lambda: (
                not pg.execute(
                    "SELECT 1 FROM payouts WHERE status IN ('pending', 'processing')"
                ).fetchone()
            ),
            timeout=60,
            what="no payout in flight",
        )
        for path, items in (("/v1/admin/payouts", "payouts"), ("/v1/audit", "entries")):
            whole = admin_list([new], path, items, 100)
            assert whole == admin_list([old], path, items, 100), path
            assert whole == admin_list([new, old], path, items, 7), path
        failed = pg.execute(
            "SELECT id, task_name, status FROM procrastinate_jobs WHERE status = 'failed'"
        ).fetchall()
        assert [] == failed
        assert [200, 200] == [httpx.get(f"{api}/ready", timeout=10).status_code for api in apis]
        assert [] == server_errors(c)
        assert all(p.alive() for p in c.procs)
