"""The one frozen Settings object, read from the environment once at start-up.

Nothing else in the service reads ``os.environ``. A bad value raises
:class:`ConfigError` naming the variable, and the CLI turns that into a
non-zero exit before anything starts.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal

from croniter import croniter

from service.domain import parse_money


class ConfigError(Exception):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    database_url: str
    billing_url: str
    billing_token: str | None
    api_tokens: tuple[str, ...]
    admin_tokens: tuple[str, ...]
    payout_period: timedelta
    instant_cooldown: timedelta
    payout_max_amount: Decimal
    billing_rps: float
    periodic_scan_cron: str
    sentry_dsn: str | None
    log_level: str
    # Not in the contract, tunable for tests and operations:
    billing_timeout_seconds: float = 10.0
    # How long a payout keeps retrying transient Billing errors before it ends
    # `failed` with `billing_unavailable`. A day covers a Billing outage over a
    # night without paging anyone, and is short enough for support to answer a park.
    billing_retry_window: timedelta = timedelta(hours=24)
    # A `doing` job whose worker has not sent a heartbeat for this long is
    # requeued. Heartbeats come every 10 s; six missed ones is a dead worker,
    # not a busy one.
    stalled_job_seconds: float = 60.0
    # Backoff between retries of one payout grows to this cap: a minute keeps
    # a recovering Billing from a thundering herd, and payouts moving soon after.
    retry_backoff_cap_seconds: float = 60.0
    # The worker wakes on NOTIFY for new jobs; polling only catches retries
    # that come due, so a couple of seconds is plenty.
    worker_poll_seconds: float = 2.0
    # On SIGTERM, running payouts get this long to finish before the worker exits.
    shutdown_grace_seconds: float = 60.0
    # The breaker opens after this many transient Billing failures in a row
    # (all hosts together). Ten is well past the odd lost answer, and still
    # only seconds of calls into an outage at BILLING_RPS.
    billing_breaker_failures: int = 10
    # An open breaker pauses every call this long before one probe call tries
    # Billing again: long enough not to hammer a Billing that is restarting.
    billing_breaker_cooloff_seconds: float = 30.0

    def __repr__(self) -> str:
        # Secrets never reach logs, even through a careless f"{settings}".
        return (
            f"Settings(billing_url={self.billing_url!r}, payout_period={self.payout_period}, "
            f"instant_cooldown={self.instant_cooldown}, "
            f"payout_max_amount={self.payout_max_amount}, billing_rps={self.billing_rps}, "
            f"periodic_scan_cron={self.periodic_scan_cron!r}, log_level={self.log_level!r})"
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _positive_number(env: Mapping[str, str], name: str, default: str) -> float:
    raw = env.get(name, default).strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {raw!r}")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: str) -> int:
    raw = env.get(name, default).strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise ConfigError(name, f"must be at least 1, got {raw!r}")
    return value


def _url(env: Mapping[str, str], name: str, *, schemes: tuple[str, ...], default: str = "") -> str:
    raw = env.get(name, default).strip()
    if not raw:
        raise ConfigError(name, "is required")
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in schemes or not (parsed.hostname or parsed.path or parsed.query):
        raise ConfigError(name, f"expected a {'/'.join(schemes)} URL")
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(name, "the URL has no host")
    return raw


def _tokens(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in env.get(name, "").split(",") if t.strip())
    for token in tokens:
        if len(token) < 16 or not token.isprintable() or " " in token:
            # The token itself is a secret: name the variable, never the value.
            raise ConfigError(name, "each token must be at least 16 printable characters")
    return tokens


def database_url(env: Mapping[str, str]) -> str:
    """Only DATABASE_URL, for commands that need nothing else (migrate, parks import)."""
    return _url(env, "DATABASE_URL", schemes=("postgresql", "postgres"))


def load(env: Mapping[str, str], *, require_database: bool = True) -> Settings:
    """Build Settings from an environment mapping, or raise ConfigError."""
    db_url = ""
    if require_database or env.get("DATABASE_URL"):
        db_url = database_url(env)

    raw_max = env.get("PAYOUT_MAX_AMOUNT", "100000.00").strip()
    try:
        max_amount = parse_money(raw_max)
    except (ValueError, decimal.InvalidOperation):
        raise ConfigError(
            "PAYOUT_MAX_AMOUNT", f"expected a positive amount like 100000.00, got {raw_max!r}"
        ) from None

    cron = env.get("PERIODIC_SCAN_CRON", "*/5 * * * *").strip()
    if not croniter.is_valid(cron) or len(cron.split()) not in (5, 6):
        raise ConfigError("PERIODIC_SCAN_CRON", f"not a valid cron expression: {cron!r}")

    level = env.get("LOG_LEVEL", "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"expected one of {', '.join(LOG_LEVELS)}")

    sentry_dsn = env.get("SENTRY_DSN", "").strip() or None
    if sentry_dsn is not None:
        _url(env, "SENTRY_DSN", schemes=("http", "https"))

    retry_hours = _positive_number(env, "BILLING_RETRY_WINDOW_HOURS", "24")
    return Settings(
        database_url=db_url,
        billing_url=_url(env, "BILLING_URL", schemes=("http", "https")).rstrip("/"),
        billing_token=env.get("BILLING_TOKEN", "").strip() or None,
        api_tokens=_tokens(env, "API_TOKENS"),
        admin_tokens=_tokens(env, "ADMIN_TOKENS"),
        payout_period=timedelta(days=_positive_number(env, "PAYOUT_PERIOD_DAYS", "7")),
        instant_cooldown=timedelta(
            hours=_positive_number(env, "INSTANT_PAYOUT_COOLDOWN_HOURS", "24")
        ),
        payout_max_amount=max_amount,
        billing_rps=_positive_number(env, "BILLING_RPS", "10"),
        periodic_scan_cron=cron,
        sentry_dsn=sentry_dsn,
        log_level=level,
        billing_timeout_seconds=_positive_number(env, "BILLING_TIMEOUT_SECONDS", "10"),
        billing_retry_window=timedelta(hours=retry_hours),
        stalled_job_seconds=_positive_number(env, "STALLED_JOB_SECONDS", "60"),
        retry_backoff_cap_seconds=_positive_number(env, "RETRY_BACKOFF_CAP_SECONDS", "60"),
        worker_poll_seconds=_positive_number(env, "WORKER_POLL_SECONDS", "2"),
        shutdown_grace_seconds=_positive_number(env, "SHUTDOWN_GRACE_SECONDS", "60"),
        billing_breaker_failures=_positive_int(env, "BILLING_BREAKER_FAILURES", "10"),
        billing_breaker_cooloff_seconds=_positive_number(
            env, "BILLING_BREAKER_COOLOFF_SECONDS", "30"
        ),
    )
