"""Metrics, logging and Sentry: everything that watches the service.

Metric names are the contract of SPEC section 6; ops/prometheus builds its
recording rules and alerts on them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from service.settings import Settings

BILLING_REQUESTS = Counter(
    "fleet_payouts_billing_requests_total",
    "Requests to Billing by endpoint and outcome.",
    ["endpoint", "outcome"],
)
BILLING_SECONDS = Histogram(
    "fleet_payouts_billing_request_seconds",
    "Duration of requests to Billing (excluding time waiting for the rate limiter).",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BILLING_BUDGET_WAIT = Histogram(
    "fleet_payouts_billing_budget_wait_seconds",
    "Time a call waited for the global Billing budget (BILLING_RPS, all hosts together).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BILLING_PAUSED = Gauge(
    "fleet_payouts_billing_breaker_open",
    "1 while calls to Billing are paused (breaker open or a Retry-After in force), else 0.",
)
BILLING_SLOTS_DROPPED = Counter(
    "fleet_payouts_billing_slots_dropped_total",
    "Send slots of the Billing budget given up because no call could leave in time.",
)
BILLING_BUDGET_RPS = Gauge(
    "fleet_payouts_billing_budget_rps",
    "The configured BILLING_RPS, so that rules and dashboards never hard-code it.",
)
RECONCILIATION_MISMATCHES = Gauge(
    "fleet_payouts_reconciliation_mismatches",
    "Mismatches with Billing found by the last daily reconciliation run.",
)
RECONCILIATION_LAST_RUN = Gauge(
    "fleet_payouts_reconciliation_last_run_timestamp_seconds",
    "When the last daily reconciliation run finished (Unix time; 0: never).",
)
DB_QUERIES = Counter(
    "fleet_payouts_db_queries_total",
    "SQL statements sent to PostgreSQL by this process.",
    ["process"],
)
DB_SECONDS = Histogram(
    "fleet_payouts_db_query_seconds",
    "Duration of SQL statements sent to PostgreSQL by this process.",
    ["process"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
PAYOUTS = Counter(
    "fleet_payouts_payouts_total",
    "Payouts that reached a final status.",
    ["kind", "status"],
)
INSTANT_PARKS = Gauge(
    "fleet_payouts_instant_payout_parks",
    "Distinct parks with a succeeded instant payout in the window.",
    ["window"],
)
JOBS = Gauge(
    "fleet_payouts_jobs",
    "procrastinate jobs by status (queue depth).",
    ["status"],
)
OLDEST_IN_FLIGHT = Gauge(
    "fleet_payouts_payout_oldest_in_flight_seconds",
    "Age of the oldest pending or processing payout (0 when none).",
)
AUDIT_MONTHS_AHEAD = Gauge(
    "fleet_payouts_audit_partitions_ahead",
    "Monthly audit_log partitions that exist beyond the current month.",
)

# Which process's statements a DB_QUERIES sample counts; set once at start-up.
PROCESS = {"name": "cli"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: greppable by humans, parseable by log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("payout_id", "park_id", "request_id", "job_id"):
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(settings: Settings, process: str) -> None:
    """Configure logging and Sentry for one process (api, worker, dev...)."""
    PROCESS["name"] = process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # httpx logs every request URL at INFO; our own billing log lines say more.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.sentry_dsn:
        import sentry_sdk

        sentry_sdk.init(
            dsn=settings.sentry_dsn,
            send_default_pii=False,  # no tokens, no user ids in headers
            traces_sample_rate=0.0,
            server_name=None,
        )
