"""ops/runbooks/README.md as a DBA pastes it: every fenced block names its role on its
first line (`-- as fleet_payouts_readonly`, `# as fleet_payouts_owner`), and runs, in
order, as a login that is a member of that role, in a session whose TimeZone is
Europe/Moscow, against a real migrated database; placeholders are filled with real ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg.rows import DictRow

from service.audit import chain as audit_chain
from service.ops import roles
from tests.conftest import with_user
from tests.helpers import audit as audit_helpers
from tests.helpers.emulator import REPO_ROOT

RUNBOOKS = REPO_ROOT / "ops" / "runbooks" / "README.md"
OPS_ROLE = "fleet_payouts_ops"
ROLES = (roles.ROLES.readonly, OPS_ROLE, roles.ROLES.owner)
# The target cluster's superuser: only the restore into a fresh cluster needs it.
SUPERUSER = "postgres"
BACKUP_SECTION = "Backup and restore"
MARKER = re.compile(r"^(?:--|#) as (\w+)\s*$")
FENCE = re.compile(r"^(\s*)```(\w+)\s*$")
# The retention runbook's example month, moved to one this database can hold.
EXAMPLE_MONTH = "2021-01-01"
TIMEZONE = "Europe/Moscow"


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    role: str | None
    text: str
    section: str


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block, de-indented as it would be pasted, with its role marker."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.group(1), opening.group(2)
        body: list[str] = []
        i += 1
        while lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker = MARKER.match(body[0]) if body else None
        role = marker.group(1) if marker else None
        blocks.append(Block(i - len(body), lang, role, "\n".join(body), section))
        i += 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in ("sql", "sh")]


def test_every_block_names_its_role() -> None:
    """Each SQL and shell block of the runbooks starts with the role it runs as."""
    unnamed = [
        b.line
        for b in runnable(fenced_blocks(RUNBOOKS.read_text()))
        if b.role not in ROLES and not (b.role == SUPERUSER and b.section == BACKUP_SECTION)
    ]
    assert [] == unnamed


def ensure_ops_role(pg: psycopg.Connection[DictRow]) -> None:
    """fleet_payouts_ops as the runbooks need it, when `migrate` has not made it (yet)."""
    exists = pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OPS_ROLE,)).fetchone()
    if not exists:
        pg.execute(f"CREATE ROLE {OPS_ROLE} NOLOGIN IN ROLE {roles.ROLES.readonly}")
    pg.execute(f"GRANT {roles.ROLES.readonly} TO {OPS_ROLE}")
    if not exists:
        pg.execute(f"GRANT UPDATE ON billing_gate, webhook_parks TO {OPS_ROLE}")
        pg.execute(f"GRANT UPDATE, DELETE ON procrastinate_jobs TO {OPS_ROLE}")
        # procrastinate's triggers log the retry in its events table.
        pg.execute(f"GRANT INSERT ON procrastinate_events TO {OPS_ROLE}")
        pg.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {OPS_ROLE}")


def dba_login(pg: psycopg.Connection[DictRow], role: str) -> str:
    """A login of the kind a DBA has: a member of `role`, whose sessions act as it."""
    login = f"fp_runbook_{role.removeprefix('fleet_payouts_')}"
    pg.execute(
        f"DO $$ BEGIN CREATE ROLE {login} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    pg.execute(f"GRANT {role} TO {login}")
    pg.execute(f"ALTER ROLE {login} SET role = '{role}'")
    return login


def fill(block: Block, values: dict[str, str], cwd: Path) -> str:
    text = block.text
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    export = cwd / f"audit_log_{values['2021_01']}.csv"
    if export.exists():
        digest = hashlib.sha256(export.read_bytes()).hexdigest()
        text = text.replace(f"<sha256 of audit_log_{values['2021_01']}.csv>", digest)
    left = re.findall(r"<[a-z][a-z0-9 ._-]*>", text)
    assert [] == left, f"block at line {block.line}: placeholders the test cannot fill"
    return text


def test_every_block_runs_as_its_role(
    db_url: str, pg: psycopg.Connection[DictRow], tmp_path: Path
) -> None:
    """Pasted in order, as its role and in Moscow time, every block succeeds: the archive of a
    month whose last entry is in its last UTC hours, and its restore, included."""
    ensure_ops_role(pg)
    urls = {role: with_user(db_url, dba_login(pg, role)) for role in ROLES}

    month = audit_helpers.months_back(3)
    following = audit_chain.next_month(month)
    for m in (month, audit_helpers.months_back(2), audit_helpers.months_back(1)):
        audit_helpers.add_month(pg, m)
    audit_helpers.write(pg, at=audit_helpers.mid(month))
    # 22:30 UTC on the last day: already the next month in Moscow (UTC+3).
    last_hours = datetime(following.year, following.month, 1, tzinfo=UTC) - timedelta(minutes=90)
    audit_helpers.write(pg, at=last_hours)
    job = pg.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, status, args) "
        "VALUES ('maintenance', 'housekeeping', 'failed', '{}') RETURNING id"
    ).fetchone()
    assert job is not None
    values = {
        "2021_01": f"{month:%Y_%m}",
        EXAMPLE_MONTH: f"{month}",
        "2021-02-01": f"{following}",
        "audit_log_2026_03": audit_helpers.partition(month),  # the monthly report's example
        "<payout id>": "00000000-0000-0000-0000-000000000000",
        "<job id>": str(job["id"]),
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "PGTZ": TIMEZONE,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for block in runnable(fenced_blocks(RUNBOOKS.read_text())):
        if block.section == BACKUP_SECTION:
            continue  # into a fresh cluster: test_backup_restores_into_a_fresh_cluster
        assert block.role is not None
        url = urls[block.role]
        script = tmp_path / f"block_{block.line}.{block.lang}"
        script.write_text(fill(block, values, tmp_path) + "\n")
        if block.lang == "sql":
            command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script), url]
        else:
            command = ["bash", "-e", "-o", "pipefail", str(script)]
        result = subprocess.run(
            command,
            env={**env, "DATABASE_URL": url, "OWNER_URL": url},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert 0 == result.returncode, (
            f"runbook block at line {block.line} as {block.role}:\n"
            f"{script.read_text()}\n{result.stdout}\n{result.stderr}"
        )
    archived = pg.execute(
        "SELECT count(*) AS n FROM audit_log WHERE at >= %s AND at < %s", (month, following)
    ).fetchone()
    assert archived is not None
    assert 2 == archived["n"]


def test_backup_restores_into_a_fresh_cluster(
    db_url: str, pg: psycopg.Connection[DictRow], tmp_path: Path
) -> None:
    """The backup and restore blocks, pasted as their roles, take a dump of a live database
    holding pg_stat_statements and a payout into a fresh cluster: pg_restore exits 0, migrate
    and audit verify pass, and the events feed check runs."""
    from fleet_payouts_devkit.postgres import temporary_server

    from tests.helpers.api import app_client, press_headers, register

    pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")  # as compose's initdb does
    with app_client(db_url) as client:
        register(client, "park-backup")
        pressed = client.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers("park-backup")
        )
        assert pressed.status_code in (201, 202), pressed.text
    source = with_user(db_url, dba_login(pg, roles.ROLES.readonly))
    today = subprocess.run(["date", "+%F"], capture_output=True, text=True, check=True).stdout
    values = {"2026-11-29": today.strip()}
    blocks = [
        b for b in runnable(fenced_blocks(RUNBOOKS.read_text())) if b.section == BACKUP_SECTION
    ]
    assert {SUPERUSER, roles.ROLES.owner, roles.ROLES.readonly} <= {b.role for b in blocks}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with temporary_server("fp-restore-", fast_unsafe=True) as cluster_url:
        restored = with_dbname_of(cluster_url, "fleet_payouts_restored")
        for block in blocks:
            assert block.role is not None
            if block.role == roles.ROLES.readonly and "RESTORED_URL" in block.text:
                with psycopg.connect(restored, autocommit=True) as new:
                    login = dba_login(new, block.role)  # type: ignore[arg-type]
                url = with_user(restored, login)
            else:
                url = with_user(restored, block.role)
            text = block.text
            for placeholder, value in values.items():
                text = text.replace(placeholder, value)
            script = tmp_path / f"block_{block.line}.sh"
            script.write_text(text + "\n")
            env = {
                **base_env,
                "DATABASE_URL": source,
                "BACKUP_DIR": str(tmp_path),
                "NEW_CLUSTER_URL": cluster_url,
                "RESTORED_URL": url,
            }
            result = subprocess.run(
                ["bash", "-e", "-o", "pipefail", str(script)],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            output = result.stdout + result.stderr
            assert 0 == result.returncode, f"block at line {block.line} as {block.role}:\n{output}"


def with_dbname_of(url: str, name: str) -> str:
    from tests.conftest import with_dbname

    return with_dbname(url, name)
