"""The alert rules on what the processes really export: a real API and real workers are
scraped, their samples become `promtool test rules` input series (labelled as
ops/prometheus/prometheus.yml labels them), and each alert must fire exactly in its
runbook's situation, made real in the database, and stay silent on a healthy fleet.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import DictRow

from service.billing.client import BillingClient, Budget
from service.ops import reconcile
from service.payouts.execution import Deps
from tests.conftest import make_settings, service_env
from tests.helpers import audit as audit_helpers
from tests.helpers.emulator import REPO_ROOT, free_port
from tests.helpers.procs import Cluster, cluster, wait_for

PROMETHEUS = REPO_ROOT / "ops" / "prometheus"
RUNBOOKS = REPO_ROOT / "ops" / "runbooks" / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)
HOSTS = ("host1", "host2", "host3")
# The scrape's moment is this far into promtool's timeline; samples hold for DURATION.
ORIGIN = 3 * 3600.0
STEPS = 420  # one-minute samples: seven hours, past every eval time
# The workers refresh their database gauges every GAUGE_SECONDS (15 in production, 0.5
# here: each step waits for one refresh, not for a quarter of a minute).
GAUGE_SECONDS = "0.5"
WORKER_GAUGE_WAIT = 40.0


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alert_rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def alert_names() -> list[str]:
    return sorted({r["alert"] for r in alert_rules()})


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url, timeout=5).text
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue  # prometheus_client's creation stamps: no rule reads them
            samples.append((s.name, dict(s.labels), float(s.value)))
    return samples


def series_line(name: str, labels: dict[str, str], value: float) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    text = "NaN" if value != value else f"{value:.6f}"
    return {"series": f"{name}{{{selector}}}", "values": f"{text}x{STEPS}"}


def as_promtool_series(
    api: list[tuple[str, dict[str, str], float]],
    workers: list[list[tuple[str, dict[str, str], float]]],
    scraped_at: float,
) -> list[dict[str, str]]:
    """Three hosts as prometheus.yml scrapes them: the API's samples on each, and one
    worker scrape per host (the first one again for hosts beyond the workers started).
    Unix timestamps move with the clock: the scrape's moment becomes ORIGIN."""
    out = []
    for i, host in enumerate(HOSTS):
        worker = workers[min(i, len(workers) - 1)]
        for job, samples in (("fleet-payouts-api", api), ("fleet-payouts-worker", worker)):
            for name, labels, value in samples:
                if name.endswith("_timestamp_seconds") and value > 0:
                    value = value - scraped_at + ORIGIN
                out.append(series_line(name, {**labels, "job": job, "host": host}, value))
            out.append(series_line("up", {"job": job, "host": host}, 1.0))
        ready = {"job": "fleet-payouts-ready", "host": host}
        out.append(series_line("probe_success", ready, 1.0))
    return out


def expected(alert: str, severity: str, value: str | None = None) -> dict[str, Any]:
    rule = next(
        r for r in alert_rules() if r["alert"] == alert and r["labels"]["severity"] == severity
    )
    annotations = {
        k: v.replace("{{ $value }}", value) if value is not None else v
        for k, v in rule["annotations"].items()
    }
    return {"exp_labels": {"severity": severity}, "exp_annotations": annotations}


def promtool_test(
    tmp_path: Path, series: list[dict[str, str]], firing: dict[str, list[dict[str, Any]]]
) -> None:
    """At ORIGIN + 2 h (every `for:` of these alerts elapsed), exactly `firing` fires."""
    at = f"{int((ORIGIN + 2 * 3600) // 60)}m"
    tests = [
        {"eval_time": at, "alertname": name, "exp_alerts": firing.get(name, [])}
        for name in alert_names()
    ]
    doc = {
        "rule_files": [str(PROMETHEUS / "alert_rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": tests}],
    }
    path = tmp_path / f"scraped_{time.monotonic_ns()}.yml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr


def check_gauge(url: str, name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, value in scrape(url):
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


class Fleet:
    """A real API and workers, scraped as Prometheus would."""

    def __init__(self, c: Cluster, worker_ports: list[int]) -> None:
        self.c = c
        self.worker_ports = worker_ports

    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/metrics" for p in self.worker_ports]

    def wait_workers(self, condition: Any, what: str) -> None:
        wait_for(
            lambda: all(condition(url) for url in self.worker_urls()),
            timeout=WORKER_GAUGE_WAIT,
            interval=0.2,
            what=what,
        )

    def series(self) -> list[dict[str, str]]:
        assert self.c.api_url is not None
        scraped_at = time.time()
        api = scrape(f"{self.c.api_url}/metrics")
        workers = [scrape(url) for url in self.worker_urls()]
        return as_promtool_series(api, workers, scraped_at)


def run_daily_reconciliation(db_url: str, billing_url: str) -> None:
    async def run() -> None:
        from service.core import db

        pool = db.make_pool(db_url, name="test", max_size=2)
        await pool.open(wait=True)
        billing = BillingClient(billing_url, token=None, timeout=2.0, budget=Budget(100))
        try:
            await reconcile.run_daily(
                Deps(pool=pool, billing=billing, settings=make_settings(db_url, billing_url))
            )
        finally:
            await billing.aclose()
            await pool.close()

    asyncio.run(run())


def audit_verify(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "service", "audit", "verify"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    ).returncode


@needs_promtool
def test_alerts_on_a_real_fleet(
    db_url: str, app_db_url: str, billing_url: str, pg: psycopg.Connection[DictRow], tmp_path: Path
) -> None:
    """On real scrapes: checks owed for 3 days and never run fire their NotRunning alerts, a fresh
    install does not; a healthy fleet fires nothing; a broken chain and one worker with another
    BILLING_RPS fire theirs."""
    env = service_env(app_db_url, billing_url, BILLING_RPS="10", GAUGE_SECONDS=GAUGE_SECONDS)
    ports = [free_port(), free_port()]
    with cluster(env, tmp_path) as c:
        c.api()
        for port in ports:
            c.worker(concurrency=2, metrics_port=port)
        fleet = Fleet(c, ports)
        never = {"audit_verify": 0.0, "reconcile": 0.0}

        # 1. Installed three days ago, neither check ever ran.
        pg.execute("UPDATE ops_checks SET expected_since = now() - interval '3 days'")
        owed = time.time() - 2.5 * 86400
        fleet.wait_workers(
            lambda u: all(
                (
                    check_gauge(u, "fleet_payouts_check_expected_since_timestamp_seconds", check=k)
                    or owed
                )
                < owed
                for k in never
            ),
            "the workers export the checks owed for three days",
        )
        promtool_test(
            tmp_path,
            fleet.series(),
            {
                "ReconciliationNotRunning": [expected("ReconciliationNotRunning", "warning")],
                "AuditVerifyNotRunning": [expected("AuditVerifyNotRunning", "warning")],
            },
        )

        # 2. A fresh install: the same "never ran", owed since now, is not late yet.
        pg.execute("UPDATE ops_checks SET expected_since = now()")
        fleet.wait_workers(
            lambda u: (
                (
                    check_gauge(
                        u,
                        "fleet_payouts_check_expected_since_timestamp_seconds",
                        check="audit_verify",
                    )
                    or 0
                )
                > owed + 86400
            ),
            "the workers export a fresh install",
        )
        promtool_test(tmp_path, fleet.series(), {})

        # 3. Healthy: both checks ran and found nothing.
        run_daily_reconciliation(db_url, billing_url)
        assert 0 == audit_verify(env)
        fleet.wait_workers(
            lambda u: (
                (check_gauge(u, "fleet_payouts_audit_verify_last_run_timestamp_seconds") or 0) > 0
                and (check_gauge(u, "fleet_payouts_reconciliation_last_run_timestamp_seconds") or 0)
                > 0
            ),
            "the workers export both checks' runs",
        )
        promtool_test(tmp_path, fleet.series(), {})

        # 4. One more worker, still on another BILLING_RPS after a half-done rollout.
        odd = free_port()
        c.worker(concurrency=2, metrics_port=odd, BILLING_RPS="20")
        fleet.worker_ports.append(odd)
        fleet.wait_workers(
            lambda u: check_gauge(u, "fleet_payouts_billing_budget_rps") is not None,
            "the third worker's metrics",
        )
        promtool_test(
            tmp_path,
            fleet.series(),
            {
                "BillingBudgetConfigDiffers": [
                    expected("BillingBudgetConfigDiffers", "warning", "20")
                ]
            },
        )
        fleet.worker_ports.pop()

        # 5. Someone edits an audit entry: the next whole-log verify says so.
        with audit_helpers.guards_off(pg):
            pg.execute(
                "UPDATE audit_log SET outcome = 'edited' WHERE id = (SELECT min(id) FROM audit_log)"
            )
        assert 1 == audit_verify(env)
        fleet.wait_workers(
            lambda u: check_gauge(u, "fleet_payouts_audit_verify_broken") == 1.0,
            "the workers export the broken chain",
        )
        promtool_test(
            tmp_path,
            fleet.series(),
            {"AuditChainBroken": [expected("AuditChainBroken", "critical")]},
        )


def test_every_alert_has_its_runbook_section() -> None:
    """Each alert's runbook_url names a heading that exists in ops/runbooks/README.md."""
    headings = {
        line.lstrip("#").strip().lower().replace(" ", "-")
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    missing = [
        r["alert"]
        for r in alert_rules()
        if r["annotations"]["runbook_url"].split("#", 1)[1] not in headings
    ]
    assert [] == missing
