"""Metrics, logging and Sentry: everything that watches the service.

Metric names are the contract of SPEC section 6; ops/prometheus builds its
recording rules and alerts on them.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from service.core.settings import Settings, secret_values

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
BILLING_CLAIMS = Counter(
    "fleet_payouts_billing_slot_claims_total",
    "Claims of Billing send slots this process made on the shared ledger (one round trip each).",
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
# The scheduled checks' verdicts (ops_checks), exported by the workers only: the API
# exports these at 0, so the rules read them with job="fleet-payouts-worker".
AUDIT_VERIFY_LAST_RUN = Gauge(
    "fleet_payouts_audit_verify_last_run_timestamp_seconds",
    "When the last whole-log `audit verify` reached a verdict (Unix time; 0: never).",
)
AUDIT_VERIFY_BROKEN = Gauge(
    "fleet_payouts_audit_verify_broken",
    "1 when the last whole-log `audit verify` found a broken link, else 0.",
)
CHECK_EXPECTED_SINCE = Gauge(
    "fleet_payouts_check_expected_since_timestamp_seconds",
    "Since when a scheduled check (audit_verify, reconcile) has been owed (Unix time).",
    ["check"],
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
OLDEST_OPEN_ORDER = Gauge(
    "fleet_payouts_payout_oldest_open_order_seconds",
    "Age of the oldest order sent to Billing whose outcome Billing has not told us (0 when none).",
)
EVENTS_UNDELIVERED = Gauge(
    "fleet_payouts_events_undelivered",
    "Events not yet delivered to WEBHOOK_URL (0 while webhooks have never been on).",
)
EVENTS_OLDEST_UNDELIVERED = Gauge(
    "fleet_payouts_events_oldest_undelivered_seconds",
    "How long the oldest event not yet delivered to WEBHOOK_URL has waited (0 when none).",
)
INSTANT_FEES = Counter(
    "fleet_payouts_instant_fees_total",
    "Fees of instant payouts that succeeded (the product's revenue), by currency.",
    ["currency"],
)
RETURNS = Counter(
    "fleet_payouts_returns_total",
    "Succeeded payouts the bank sent back, applied by this process, by return code.",
    ["code"],
)
MANUAL_PENDING_APPROVAL = Gauge(
    "fleet_payouts_manual_payouts_pending_approval",
    "Manual payouts awaiting a second admin's approval.",
)
MANUAL_OLDEST_PENDING_APPROVAL = Gauge(
    "fleet_payouts_manual_payouts_oldest_pending_approval_seconds",
    "How long the oldest manual payout awaiting approval has waited (0 when none).",
)
AUDIT_MONTHS_AHEAD = Gauge(
    "fleet_payouts_audit_partitions_ahead",
    "Monthly audit_log partitions that exist beyond the current month.",
)

HTTP_REQUESTS = Counter(
    "fleet_payouts_http_requests_total",
    "HTTP requests answered by the API, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "fleet_payouts_http_request_seconds",
    "Time from a request's arrival to its response, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Which process's statements a DB_QUERIES sample counts; set once at start-up.
PROCESS = {"name": "cli"}


# --- what every log line and Sentry event of one request or job carries ----------

# The fields a request or a job has bound so far (request_id, park_id, payout_id,
# kind...). One mutable dict per request or job: a field bound deep in a handler
# is seen by the middleware's access line, which runs in the same context.
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "fleet_payouts_log_context", default=None
)
CONTEXT_FIELDS = ("request_id", "park_id", "payout_id", "kind", "job_id")
# Fields that become Sentry tags (searchable); the request id too, to find the logs.
SENTRY_TAGS = ("request_id", "park_id", "payout_id", "kind")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """A fresh context for one request or job, holding `fields` and whatever is bound later."""
    current = {k: v for k, v in fields.items() if v is not None}
    token = _CONTEXT.set(current)
    try:
        yield current
    finally:
        _CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current request's or job's context (no-op outside one)."""
    current = _CONTEXT.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


def context() -> dict[str, Any]:
    return dict(_CONTEXT.get() or {})


class ContextFilter(logging.Filter):
    """Copies the current request's or job's fields onto every record it logs.

    Installed on the handler, so records of every library (uvicorn, psycopg,
    procrastinate) logged inside a request carry its request id too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_CONTEXT.get() or {}).items():
            if record.__dict__.get(key) is None:
                record.__dict__[key] = value
        return True


# What the API's access line adds (see service/web/middleware.py).
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "client_ip")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: greppable by humans, parseable by log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*CONTEXT_FIELDS, *ACCESS_FIELDS):
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
    if settings.log_format == "text":
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {process:>6} %(levelname)-7s %(message)s")
        )
        # Every job start and end, every periodic tick: chatter a person reading
        # the terminal does not want at INFO.
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
    else:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # httpx logs every request URL at INFO; our own billing log lines say more.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.sentry_dsn:
        init_sentry(settings)


def init_sentry(settings: Settings, **options: Any) -> None:
    """Sentry with our tags and scrubbing; `options` (a transport) are for tests.

    The SDK's default collects no personal data (no cookies, client IPs or
    sensitive headers); before_send removes what could still carry a secret.
    """
    import sentry_sdk

    sentry_sdk.init(
        dsn=settings.sentry_dsn.reveal() if settings.sentry_dsn else None,
        traces_sample_rate=0.0,
        server_name=None,
        release=settings.sentry_release or f"fleet-payouts@{_version()}",
        environment=settings.sentry_environment,
        before_send=_before_send(_secrets(settings)),
        **options,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("fleet-payouts")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _secrets(settings: Settings) -> tuple[str, ...]:
    # Every Secret setting (tokens, keys, the DSN, the database URL and its password), as
    # written and as a frame variable's repr or a JSON string writes it inside a longer text:
    # a backslash doubled, a quote escaped (a password `ab\cd` shows as `ab\\cd` there).
    found: set[str] = set()
    for text in secret_values(settings):
        found.update(
            (
                text,
                repr(text)[1:-1],
                repr(text + "'\"")[1:-4],  # the quotes force repr's escaped-quote style
                json.dumps(text)[1:-1],
                json.dumps(text, ensure_ascii=False)[1:-1],
            )
        )
    return tuple(sorted(found, key=len, reverse=True))


# Keys whose values never leave the process, wherever they sit in an event.
_SECRET_KEYS = frozenset(
    {"authorization", "cookie", "set-cookie", "x-api-key", "webhook_secret", "token", "password"}
)
REDACTED = "[redacted]"


def _before_send(secrets: tuple[str, ...]) -> Any:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        tags = event.setdefault("tags", {})
        for key, value in (_CONTEXT.get() or {}).items():
            if key in SENTRY_TAGS:
                tags.setdefault(key, str(value))
        scrubbed: dict[str, Any] = _scrub(event, secrets)
        return scrubbed

    return before_send


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """Every secret-named key redacted, every configured secret cut out of every string."""
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k) else _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # Header lists come as [name, value] pairs.
        if len(value) == 2 and isinstance(value[0], str) and _is_secret_key(value[0]):
            return [value[0], REDACTED]
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    return value


def _is_secret_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return lowered in _SECRET_KEYS or "token" in lowered or "secret" in lowered
