"""The one frozen Settings object, read from the environment once at start-up.

Nothing else in the service reads ``os.environ``. A bad value raises
:class:`ConfigError` naming the variable, and the CLI turns that into a
non-zero exit before anything starts.
"""

from __future__ import annotations

import dataclasses
import decimal
import ipaddress
import math
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal

from croniter import croniter

from service.core.values import parse_money


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
    # "json" (one object per line, for log shippers) or "text" (for people:
    # `dev` sets it).
    log_format: str = "json"
    # MANUAL_PAYOUT_APPROVAL_HOURS: a manual payout not approved within it expires.
    manual_payout_approval_window: timedelta = timedelta(hours=72)
    # SPEC's PAYOUT_MIN_AMOUNT: smaller amounts are never ordered.
    payout_min_amount: Decimal = Decimal("1.00")
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
    # On SIGTERM, running payouts (worker) and requests in flight (API) get
    # this long to finish before the process exits.
    shutdown_grace_seconds: float = 60.0
    # The API's request pool, per process. A press holds a connection for a
    # few milliseconds; ten per process serve hundreds of presses a second,
    # and three hosts stay far below PostgreSQL's max_connections.
    api_pool_min_size: int = 2
    api_pool_max_size: int = 10
    # How long a request waits for a free connection before answering 503:
    # a caller retrying with its Idempotency-Key beats a caller left hanging.
    api_pool_timeout_seconds: float = 2.0
    # Set on every request-path connection, so a slow or locked database
    # answers 503 in seconds instead of holding a pooled connection.
    # A press takes milliseconds and holds its park's row lock as briefly.
    api_statement_timeout_seconds: float = 3.0
    api_lock_timeout_seconds: float = 1.0
    # Admin reads (GET /v1/audit, GET /v1/parks) and the gauges get their own
    # small pool: a slow report can never take a press's connection.
    admin_pool_max_size: int = 2
    admin_statement_timeout_seconds: float = 5.0
    # On SIGTERM /ready answers 503 at once while the API keeps serving this
    # long, so the load balancer stops sending before connections close.
    api_drain_seconds: float = 5.0
    # Peers whose X-Forwarded-For is believed (the load balancers); from any
    # other peer the header is ignored, since anyone can write it.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    sentry_environment: str = "production"
    sentry_release: str | None = None
    # SPEC section 3: every event is POSTed there, signed with the secret. None: off.
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # SPEC section 3: events older than this are deleted (410 cursor_expired).
    events_retention_days: float = 90.0
    # The breaker opens after this many transient Billing failures in a row
    # (all hosts together). Ten is well past the odd lost answer, and still
    # only seconds of calls into an outage at BILLING_RPS.
    billing_breaker_failures: int = 10
    # An open breaker pauses every call this long before one probe call tries
    # Billing again: long enough not to hammer a Billing that is restarting.
    billing_breaker_cooloff_seconds: float = 30.0
    # SPEC section 9: the support console at /console, off unless a secret signs its
    # sessions. Eight hours is one shift: a session never outlives the person's day.
    console_secret: str | None = None
    console_session_hours: float = 8.0
    # The key page cursors are signed with (service/web/cursors.py); None: derived from
    # the tokens. The same on every host, or cursors fail from one host to the next.
    cursor_secret: str | None = None
    # The HTTP edge (service/web/edge.py). Open connections beyond this are answered 503:
    # each may hold ~100 kB of buffers, so 1000 bound that at ~100 MB, and three hosts
    # behind a load balancer that reuses its connections never need as many.
    api_max_connections: int = 1000
    # A request's head, then its body (16 KiB at most), must arrive within these: any
    # real client sends them in milliseconds; a slowloris is cut off at once.
    api_header_timeout_seconds: float = 10.0
    api_body_timeout_seconds: float = 10.0
    # An idle keep-alive connection closes after this (a front proxy's upstream
    # keep-alive must be shorter, see ops/proxy/).
    api_keep_alive_seconds: float = 5.0

    def __repr__(self) -> str:
        # Secrets never reach logs, even through a careless f"{settings}".
        return (
            f"Settings(billing_url={self.billing_url!r}, payout_period={self.payout_period}, "
            f"instant_cooldown={self.instant_cooldown}, "
            f"payout_max_amount={self.payout_max_amount}, billing_rps={self.billing_rps}, "
            f"periodic_scan_cron={self.periodic_scan_cron!r}, log_level={self.log_level!r})"
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# Upper bounds on durations and rates. A value past them is a typo (hours
# for seconds, a stray digit), and time arithmetic on centuries overflows.
MAX_PERIOD_DAYS = 366.0
MAX_COOLDOWN_HOURS = 24 * 366.0
MAX_RETRY_WINDOW_HOURS = 24 * 31.0
MAX_SECONDS = 24 * 3600.0
MAX_RPS = 100_000.0
# Events are kept for years at most (past that, a typo), and at least a week:
# the database refuses to expire younger ones (migrations/0008).
MAX_RETENTION_DAYS = 3660.0
MIN_RETENTION_DAYS = 7.0


def _retention_days(env: Mapping[str, str]) -> float:
    days = _positive_number(env, "EVENTS_RETENTION_DAYS", "90", maximum=MAX_RETENTION_DAYS)
    if days < MIN_RETENTION_DAYS:
        raise ConfigError("EVENTS_RETENTION_DAYS", f"must be at least {MIN_RETENTION_DAYS:g}")
    return days


def _positive_number(
    env: Mapping[str, str], name: str, default: str, *, maximum: float = MAX_SECONDS
) -> float:
    raw = env.get(name, default).strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number, got {raw!r}")
    if value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {raw!r}")
    return value


def _money_setting(env: Mapping[str, str], name: str, default: str) -> Decimal:
    raw = env.get(name, default).strip()
    try:
        return parse_money(raw)
    except (ValueError, decimal.InvalidOperation):
        raise ConfigError(name, f"expected a positive amount like {default}, got {raw!r}") from None


def _count(env: Mapping[str, str], name: str, default: str) -> int:
    raw = env.get(name, default).strip()
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ConfigError(name, f"expected a whole number of at least 1, got {raw!r}")
    return int(raw)


def _seconds(env: Mapping[str, str], name: str, default: str) -> float:
    """A duration that may be zero (switched off)."""
    raw = env.get(name, default).strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(name, f"must be zero or a positive number, got {raw!r}")
    return value


def _networks(
    env: Mapping[str, str], name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    found = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                name, f"expected IP addresses or networks (10.0.0.0/8), got {item.strip()!r}"
            ) from None
    return tuple(found)


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


def _webhook(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """WEBHOOK_URL and the WEBHOOK_SECRET it requires; (None, None) when off."""
    if not env.get("WEBHOOK_URL", "").strip():
        return None, None
    url = _url(env, "WEBHOOK_URL", schemes=("http", "https"))
    secret = env.get("WEBHOOK_SECRET", "").strip()
    if not secret:
        raise ConfigError("WEBHOOK_SECRET", "is required when WEBHOOK_URL is set")
    # The HMAC key consumers verify signatures with: as hard to guess as a token.
    if len(secret) < 16 or not secret.isprintable():
        raise ConfigError("WEBHOOK_SECRET", "must be at least 16 printable characters")
    return url, secret


# A console session longer than a week is a forgotten browser, not a shift.
MAX_SESSION_HOURS = 24 * 7.0


def _console_secret(env: Mapping[str, str]) -> str | None:
    secret = env.get("CONSOLE_SECRET", "").strip() or None
    if secret is not None and len(secret) < 32:
        # It signs sessions that act with an admin's rights: a short one could be guessed.
        raise ConfigError("CONSOLE_SECRET", "must be at least 32 characters")
    return secret


def _cursor_secret(env: Mapping[str, str]) -> str | None:
    secret = env.get("CURSOR_SECRET", "").strip()
    if secret and (len(secret) < 16 or not secret.isprintable()):
        # A secret: name the variable, never the value.
        raise ConfigError("CURSOR_SECRET", "must be at least 16 printable characters")
    return secret or None


def database_url(env: Mapping[str, str]) -> str:
    """Only DATABASE_URL, for commands that need nothing else (migrate, parks import)."""
    return _url(env, "DATABASE_URL", schemes=("postgresql", "postgres"))


def load(env: Mapping[str, str], *, require_database: bool = True) -> Settings:
    """Build Settings from an environment mapping, or raise ConfigError."""
    db_url = ""
    if require_database or env.get("DATABASE_URL"):
        db_url = database_url(env)

    max_amount = _money_setting(env, "PAYOUT_MAX_AMOUNT", "100000.00")
    min_amount = _money_setting(env, "PAYOUT_MIN_AMOUNT", "1.00")
    if min_amount > max_amount:
        raise ConfigError("PAYOUT_MIN_AMOUNT", f"must not exceed PAYOUT_MAX_AMOUNT ({max_amount})")

    cron = env.get("PERIODIC_SCAN_CRON", "*/5 * * * *").strip()
    if not croniter.is_valid(cron) or len(cron.split()) not in (5, 6):
        raise ConfigError("PERIODIC_SCAN_CRON", f"not a valid cron expression: {cron!r}")

    level = env.get("LOG_LEVEL", "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"expected one of {', '.join(LOG_LEVELS)}")

    log_format = env.get("LOG_FORMAT", "json").strip().lower()
    if log_format not in ("json", "text"):
        raise ConfigError("LOG_FORMAT", "expected json or text")

    sentry_dsn = env.get("SENTRY_DSN", "").strip() or None
    if sentry_dsn is not None:
        _url(env, "SENTRY_DSN", schemes=("http", "https"))

    retry_hours = _positive_number(
        env, "BILLING_RETRY_WINDOW_HOURS", "24", maximum=MAX_RETRY_WINDOW_HOURS
    )
    pool_min = _count(env, "API_POOL_MIN_SIZE", "2")
    pool_max = _count(env, "API_POOL_MAX_SIZE", "10")
    if pool_min > pool_max:
        raise ConfigError("API_POOL_MIN_SIZE", f"is above API_POOL_MAX_SIZE ({pool_max})")
    webhook_url, webhook_secret = _webhook(env)
    return Settings(
        database_url=db_url,
        billing_url=_url(env, "BILLING_URL", schemes=("http", "https")).rstrip("/"),
        billing_token=env.get("BILLING_TOKEN", "").strip() or None,
        api_tokens=_tokens(env, "API_TOKENS"),
        admin_tokens=_tokens(env, "ADMIN_TOKENS"),
        payout_period=timedelta(
            days=_positive_number(env, "PAYOUT_PERIOD_DAYS", "7", maximum=MAX_PERIOD_DAYS)
        ),
        instant_cooldown=timedelta(
            hours=_positive_number(
                env, "INSTANT_PAYOUT_COOLDOWN_HOURS", "24", maximum=MAX_COOLDOWN_HOURS
            )
        ),
        payout_max_amount=max_amount,
        payout_min_amount=min_amount,
        billing_rps=_positive_number(env, "BILLING_RPS", "10", maximum=MAX_RPS),
        periodic_scan_cron=cron,
        sentry_dsn=sentry_dsn,
        log_level=level,
        log_format=log_format,
        billing_timeout_seconds=_positive_number(env, "BILLING_TIMEOUT_SECONDS", "10"),
        billing_retry_window=timedelta(hours=retry_hours),
        stalled_job_seconds=_positive_number(env, "STALLED_JOB_SECONDS", "60"),
        retry_backoff_cap_seconds=_positive_number(env, "RETRY_BACKOFF_CAP_SECONDS", "60"),
        worker_poll_seconds=_positive_number(env, "WORKER_POLL_SECONDS", "2"),
        shutdown_grace_seconds=_positive_number(env, "SHUTDOWN_GRACE_SECONDS", "60"),
        api_pool_min_size=pool_min,
        api_pool_max_size=pool_max,
        api_pool_timeout_seconds=_positive_number(env, "API_POOL_TIMEOUT_SECONDS", "2"),
        api_statement_timeout_seconds=_positive_number(env, "API_STATEMENT_TIMEOUT_SECONDS", "3"),
        api_lock_timeout_seconds=_positive_number(env, "API_LOCK_TIMEOUT_SECONDS", "1"),
        admin_pool_max_size=_count(env, "ADMIN_POOL_MAX_SIZE", "2"),
        admin_statement_timeout_seconds=_positive_number(
            env, "ADMIN_STATEMENT_TIMEOUT_SECONDS", "5"
        ),
        api_drain_seconds=_seconds(env, "API_DRAIN_SECONDS", "5"),
        trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        sentry_environment=env.get("SENTRY_ENVIRONMENT", "").strip() or "production",
        sentry_release=env.get("SENTRY_RELEASE", "").strip() or None,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        manual_payout_approval_window=timedelta(
            hours=_positive_number(
                env, "MANUAL_PAYOUT_APPROVAL_HOURS", "72", maximum=MAX_COOLDOWN_HOURS
            )
        ),
        events_retention_days=_retention_days(env),
        billing_breaker_failures=_count(env, "BILLING_BREAKER_FAILURES", "10"),
        billing_breaker_cooloff_seconds=_positive_number(
            env, "BILLING_BREAKER_COOLOFF_SECONDS", "30"
        ),
        console_secret=_console_secret(env),
        console_session_hours=_positive_number(
            env, "CONSOLE_SESSION_HOURS", "8", maximum=MAX_SESSION_HOURS
        ),
        cursor_secret=_cursor_secret(env),
        api_max_connections=_count(env, "API_MAX_CONNECTIONS", "1000"),
        api_header_timeout_seconds=_positive_number(env, "API_HEADER_TIMEOUT_SECONDS", "10"),
        api_body_timeout_seconds=_positive_number(env, "API_BODY_TIMEOUT_SECONDS", "10"),
        api_keep_alive_seconds=_positive_number(env, "API_KEEP_ALIVE_SECONDS", "5"),
    )
