"""The one frozen Settings object, read from the environment once at start-up.

Every setting is declared once, on its field (:func:`setting`): the environment
variable, how its text is cast and bounded, its default as an operator writes it,
and one line of help. :func:`load`, the tests' Settings and README's configuration
table (a test compares them) all follow from those declarations.

Nothing else in the service reads ``os.environ``. A bad value raises
:class:`ConfigError` naming the variable, and the CLI turns that into a
non-zero exit before anything starts. Secrets are :class:`Secret`: they print
as ``***`` and are used through ``reveal()``.
"""

# RUF009: `setting(...)` returns a dataclasses.field, which ruff cannot tell from a call.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import decimal
import hmac
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import sentry_sdk.utils
from croniter import croniter

from service.core.values import parse_money


class ConfigError(Exception):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class Secret:
    """A configured secret, used through `reveal()`.

    repr, str and format show ``***``: a careless f-string, a log line, a Sentry
    event or a traceback's locals never carry the value. Equality (with another
    Secret or a plain string) takes the same time wherever the two differ.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The secret's text, for the one call that needs it (a header, a key, a connect)."""
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Secret cannot be changed")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a Secret cannot be changed")

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            text = other._value
        elif isinstance(other, str):
            text = other
        else:
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), text.encode())

    def __hash__(self) -> int:
        # Equal to the plain string's, as equality is.
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # copy, deepcopy (dataclasses.replace, asdict) and pickle rebuild it through __init__.
        return (Secret, (self._value,))


class Invalid(Exception):
    """A cast's refusal of a variable's text; load() names the variable."""


Cast = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class Variable:
    """Where one Settings field comes from: its ``metadata["variable"]``."""

    name: str
    # The text taken when the variable is unset; "" is "not set" (None, or an empty list).
    default: str
    # The stripped text to a value, or Invalid (never echoing a secret's text).
    cast: Cast
    help: str
    # Bounds on a cast number, checked before `unit` turns it into the field's value.
    above: float | None = None  # exclusive
    minimum: float | None = None
    maximum: float | None = None
    unit: Callable[[Any], Any] | None = None
    # Another variable whose value this one may not exceed.
    at_most: str | None = None
    required: bool = False
    # Read only when that other variable is set; unset (and unchecked) otherwise.
    only_with: str | None = None
    # The value (each item of a list) is held as a Secret.
    secret: bool = False
    # `VAR=` counts as unset. Elsewhere a blank number is refused: a half-written
    # template should stop start-up, not quietly take the default.
    blank_is_unset: bool = False
    # README's default column, where it is not `default` itself (an unset value's meaning).
    documented: str | None = None

    def read(self, env: Mapping[str, str], *, required: bool) -> Any:
        """The field's value from `env`, or ConfigError naming the variable."""
        if self.only_with is not None and not env.get(self.only_with, "").strip():
            return self.value(self.default)
        text = env.get(self.name)
        if text is None or (self.blank_is_unset and not text.strip()):
            text = self.default
        text = text.strip()
        if required and not text:
            when = f" when {self.only_with} is set" if self.only_with else ""
            raise ConfigError(self.name, f"is required{when}")
        return self.value(text)

    def value(self, text: str) -> Any:
        """The field's value for the variable's stripped text, or ConfigError naming it."""
        # A stray control character is a mistake (the text may be a secret: never echoed);
        # a list may still break its lines after a comma.
        if not re.sub(r"\s*,\s*", ",", text).isprintable():
            raise ConfigError(self.name, "contains a control character")
        try:
            value = self.cast(text)
            self._check_bounds(value, text)
        except Invalid as exc:
            raise ConfigError(self.name, str(exc)) from None
        if self.unit is not None:
            value = self.unit(value)
        return hide(value) if self.secret else value

    def _check_bounds(self, number: Any, text: str) -> None:
        if self.above is not None and not number > self.above:
            if self.above == 0:
                raise Invalid(f"must be a positive number, got {text!r}")
            raise Invalid(f"must be above {self.above:g}, got {text!r}")
        if self.minimum is not None and number < self.minimum:
            raise Invalid(f"must be at least {self.minimum:g}, got {text!r}")
        if self.maximum is not None and number > self.maximum:
            raise Invalid(f"must be at most {self.maximum:g}, got {text!r}")


def hide(value: Any) -> Any:
    """A secret setting's value as Secret: a string, or each string of a tuple; None stays."""
    if isinstance(value, str):
        return Secret(value)
    if isinstance(value, tuple):
        return tuple(hide(item) for item in value)
    return value


def setting(
    name: str,
    default: str,
    cast: Cast,
    help: str,
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    unit: Callable[[Any], Any] | None = None,
    at_most: str | None = None,
    required: bool = False,
    only_with: str | None = None,
    secret: bool = False,
    blank_is_unset: bool = False,
    documented: str | None = None,
) -> Any:
    """A Settings field read from the environment variable `name` (see Variable).

    The field's default is the cast default text, so Settings built in code (tests)
    and Settings loaded from an empty environment agree; a required one has none.
    """
    variable = Variable(
        name=name,
        default=default,
        cast=cast,
        help=help,
        above=above,
        minimum=minimum,
        maximum=maximum,
        unit=unit,
        at_most=at_most,
        required=required,
        only_with=only_with,
        secret=secret,
        blank_is_unset=blank_is_unset,
        documented=documented,
    )
    metadata = {"variable": variable}
    if required and only_with is None:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=variable.value(default), metadata=metadata)


# Casts: the stripped text to a value, or Invalid.


def number(text: str) -> float:
    # float() also reads `1_5` as 15 and other scripts' digits: no operator means those.
    if not text.isascii() or "_" in text:
        raise Invalid(f"expected a number, got {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise Invalid(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise Invalid(f"must be a finite number, got {text!r}")
    return value


def whole(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise Invalid(f"expected a whole number, got {text!r}")
    return int(text)


def amount(text: str) -> Decimal:
    try:
        return parse_money(text)
    except (ValueError, decimal.InvalidOperation):
        raise Invalid(f"expected a positive amount like 100.00, got {text!r}") from None


def days(value: float) -> timedelta:
    return timedelta(days=value)


def hours(value: float) -> timedelta:
    return timedelta(hours=value)


def cron(text: str) -> str:
    if not croniter.is_valid(text) or len(text.split()) not in (5, 6):
        raise Invalid(f"not a valid cron expression: {text!r}")
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise Invalid(f"expected one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise Invalid("expected json or text")
    return text.lower()


def optional_text(text: str) -> str | None:
    return text or None


def url(*schemes: str) -> Cast:
    """A URL with one of `schemes` (None when unset); a DSN's key is never echoed."""

    def cast(text: str) -> str | None:
        if not text:
            return None
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme not in schemes or not (parsed.hostname or parsed.path or parsed.query):
            raise Invalid(f"expected a {'/'.join(schemes)} URL")
        if parsed.scheme in ("http", "https") and not parsed.hostname:
            raise Invalid("the URL has no host")
        return text

    return cast


def postgres_url(text: str) -> str | None:
    """A PostgreSQL URL libpq can parse. libpq's own refusal quotes the bad token, which
    can be the password (a stray `%`): refused here, at start-up, without the text."""
    value: str | None = url("postgresql", "postgres")(text)
    if value:
        try:
            psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError:
            raise Invalid(
                "libpq cannot parse it (its text not shown: a `%` in a password is written %25)"
            ) from None
    return value


def sentry_dsn(text: str) -> str | None:
    """A DSN Sentry's client accepts (else it fails start-up with a traceback, not a
    configuration error): a host, a numeric project, a port in range."""
    value: str | None = url("http", "https")(text)
    if value:
        try:
            sentry_sdk.utils.Dsn(value)
        except (sentry_sdk.utils.BadDsn, ValueError):
            raise Invalid("not a Sentry DSN (https://KEY@HOST/PROJECT)") from None
    return value


def base_url(text: str) -> str | None:
    value: str | None = url("http", "https")(text)
    return value.rstrip("/") if value else value


def tokens(text: str) -> tuple[str, ...]:
    """Comma-separated tokens, each as hard to guess as a password."""
    found = tuple(t.strip() for t in text.split(",") if t.strip())
    for token in found:
        if len(token) < 16 or not token.isprintable() or " " in token:
            # The token itself is a secret: name the variable, never the value.
            raise Invalid("each token must be at least 16 printable characters")
    return found


def key(length: int) -> Cast:
    """A signing key of at least `length` characters (None when unset); never echoed."""

    def cast(text: str) -> str | None:
        if text and len(text) < length:
            raise Invalid(f"must be at least {length} printable characters")
        return text or None

    return cast


def bearer(text: str) -> str | None:
    """A token sent in an Authorization header: one word."""
    if any(c.isspace() for c in text):
        raise Invalid("must be one word, without spaces")
    return text or None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(text: str) -> tuple[Network, ...]:
    found = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise Invalid(
                f"expected IP addresses or networks (10.0.0.0/8), got {item.strip()!r}"
            ) from None
    return tuple(found)


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
# A console session longer than a week is a forgotten browser, not a shift.
MAX_SESSION_HOURS = 24 * 7.0


def seconds(name: str, default: str, help: str, *, zero: bool = False) -> Any:
    """A duration in seconds up to a day: positive, or (`zero`) zero to switch it off."""
    if zero:
        return setting(name, default, number, help, minimum=0, maximum=MAX_SECONDS)
    return setting(name, default, number, help, above=0, maximum=MAX_SECONDS)


def count(name: str, default: str, help: str, *, at_most: str | None = None) -> Any:
    return setting(name, default, whole, help, minimum=1, at_most=at_most)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the service, each declared once by `setting()` on its field."""

    # SPEC section 5. Required, so first: a dataclass's fields without defaults lead.
    database_url: Secret = setting(
        "DATABASE_URL",
        "",
        postgres_url,
        "PostgreSQL URL (its password is a secret)",
        required=True,
        secret=True,
        documented="— (required; dev embeds one)",
    )
    billing_url: str = setting(
        "BILLING_URL", "", base_url, "Billing base URL", required=True, documented="— (required)"
    )
    billing_token: Secret | None = setting(
        "BILLING_TOKEN",
        "",
        bearer,
        "sent as Authorization: Bearer to Billing",
        secret=True,
        documented="none",
    )
    api_tokens: tuple[Secret, ...] = setting(
        "API_TOKENS",
        "",
        tokens,
        "comma-separated tokens for park-scoped endpoints",
        secret=True,
        documented="none",
    )
    admin_tokens: tuple[Secret, ...] = setting(
        "ADMIN_TOKENS",
        "",
        tokens,
        "comma-separated tokens for admin endpoints",
        secret=True,
        documented="none",
    )
    payout_period: timedelta = setting(
        "PAYOUT_PERIOD_DAYS",
        "7",
        number,
        "N: a park unpaid for N days is paid by the periodic scan",
        above=0,
        maximum=MAX_PERIOD_DAYS,
        unit=days,
    )
    instant_cooldown: timedelta = setting(
        "INSTANT_PAYOUT_COOLDOWN_HOURS",
        "24",
        number,
        "K: at most one instant payout per K hours",
        above=0,
        maximum=MAX_COOLDOWN_HOURS,
        unit=hours,
    )
    payout_max_amount: Decimal = setting(
        "PAYOUT_MAX_AMOUNT", "100000.00", amount, "the most one payout moves"
    )
    # Smaller amounts are never ordered.
    payout_min_amount: Decimal = setting(
        "PAYOUT_MIN_AMOUNT",
        "1.00",
        amount,
        "the least one payout moves",
        at_most="PAYOUT_MAX_AMOUNT",
    )
    billing_rps: float = setting(
        "BILLING_RPS",
        "10",
        number,
        "Billing request budget for all hosts together",
        above=0,
        maximum=MAX_RPS,
    )
    periodic_scan_cron: str = setting(
        "PERIODIC_SCAN_CRON", "*/5 * * * *", cron, "when the scan runs; a sixth field is seconds"
    )
    sentry_dsn: Secret | None = setting(
        "SENTRY_DSN",
        "",
        sentry_dsn,
        "error reporting (the DSN's key is a secret)",
        secret=True,
        documented="off",
    )
    log_level: str = setting("LOG_LEVEL", "INFO", log_level, "log level (stderr)")
    # "json" (one object per line, for log shippers) or "text" (for people: `dev` sets it).
    log_format: str = setting("LOG_FORMAT", "json", log_format, "json or text")
    # A manual payout not approved within it expires.
    manual_payout_approval_window: timedelta = setting(
        "MANUAL_PAYOUT_APPROVAL_HOURS",
        "72",
        number,
        "a manual payout not approved within this many hours expires",
        above=0,
        maximum=MAX_COOLDOWN_HOURS,
        unit=hours,
    )
    # Not in the contract, tunable for tests and operations:
    billing_timeout_seconds: float = seconds(
        "BILLING_TIMEOUT_SECONDS", "10", "one Billing request's timeout"
    )
    # How long a payout keeps retrying transient Billing errors before it ends
    # `failed` with `billing_unavailable`. A day covers a Billing outage over a
    # night without paging anyone, and is short enough for support to answer a park.
    billing_retry_window: timedelta = setting(
        "BILLING_RETRY_WINDOW_HOURS",
        "24",
        number,
        "how long transient Billing errors on the balance read are retried",
        above=0,
        maximum=MAX_RETRY_WINDOW_HOURS,
        unit=hours,
    )
    # A `doing` job whose worker has not sent a heartbeat for this long is
    # requeued. Heartbeats come every 10 s; six missed ones is a dead worker,
    # not a busy one.
    stalled_job_seconds: float = seconds(
        "STALLED_JOB_SECONDS", "60", "a worker silent this long is dead: its jobs are requeued"
    )
    # Every process reads its database-backed gauges (queue depth, in-flight ages,
    # checks owed, webhooks) this often, never at scrape time: a scrape never waits
    # on the database. Alerts wait minutes (`for:`), so 15 s costs nothing.
    # At least 0.1 s: a shorter period reads the database in a busy loop on every process.
    gauge_seconds: float = setting(
        "GAUGE_SECONDS",
        "15",
        number,
        "how often each process reads its gauges from the database",
        minimum=0.1,
        maximum=MAX_SECONDS,
    )
    # Backoff between retries of one payout grows to this cap: a minute keeps
    # a recovering Billing from a thundering herd, and payouts moving soon after.
    retry_backoff_cap_seconds: float = seconds(
        "RETRY_BACKOFF_CAP_SECONDS", "60", "the cap of the exponential backoff between retries"
    )
    # The worker wakes on NOTIFY for new jobs; polling only catches retries
    # that come due, so a couple of seconds is plenty.
    worker_poll_seconds: float = seconds(
        "WORKER_POLL_SECONDS", "2", "how often an idle worker looks for retries that came due"
    )
    # On SIGTERM, running payouts (worker) and requests in flight (API) get
    # this long to finish before the process exits.
    shutdown_grace_seconds: float = seconds(
        "SHUTDOWN_GRACE_SECONDS", "60", "on SIGTERM, how long work in flight gets to finish"
    )
    # The API's request pool, per process. A press holds a connection for a
    # few milliseconds; ten per process serve hundreds of presses a second,
    # and three hosts stay far below PostgreSQL's max_connections.
    api_pool_min_size: int = count(
        "API_POOL_MIN_SIZE",
        "2",
        "connections kept open per API process",
        at_most="API_POOL_MAX_SIZE",
    )
    api_pool_max_size: int = count(
        "API_POOL_MAX_SIZE", "10", "connections per API process for presses and park reads"
    )
    # How long a request waits for a free connection before answering 503:
    # a caller retrying with its Idempotency-Key beats a caller left hanging.
    api_pool_timeout_seconds: float = seconds(
        "API_POOL_TIMEOUT_SECONDS", "2", "how long a request waits for a free connection"
    )
    # Set on every request-path connection, so a slow or locked database
    # answers 503 in seconds instead of holding a pooled connection.
    # A press takes milliseconds and holds its park's row lock as briefly.
    api_statement_timeout_seconds: float = seconds(
        "API_STATEMENT_TIMEOUT_SECONDS", "3", "statement_timeout on the API's connections"
    )
    api_lock_timeout_seconds: float = seconds(
        "API_LOCK_TIMEOUT_SECONDS", "1", "lock_timeout on the API's connections"
    )
    # Admin reads (GET /v1/audit, GET /v1/parks) and the gauges get their own
    # small pool: a slow report can never take a press's connection.
    admin_pool_max_size: int = count(
        "ADMIN_POOL_MAX_SIZE", "2", "connections per API process for admin reads and gauges"
    )
    admin_statement_timeout_seconds: float = seconds(
        "ADMIN_STATEMENT_TIMEOUT_SECONDS", "5", "statement_timeout of admin reads"
    )
    # On SIGTERM /ready answers 503 at once while the API keeps serving this
    # long, so the load balancer stops sending before connections close.
    api_drain_seconds: float = seconds(
        "API_DRAIN_SECONDS",
        "5",
        "on SIGTERM, how long the API keeps serving (0: no drain)",
        zero=True,
    )
    # Peers whose X-Forwarded-For is believed (the load balancers); from any
    # other peer the header is ignored, since anyone can write it.
    trusted_proxies: tuple[Network, ...] = setting(
        "TRUSTED_PROXIES",
        "",
        networks,
        "the load balancers' IPs or networks, whose X-Forwarded-For is believed",
        documented="none",
    )
    sentry_environment: str = setting(
        "SENTRY_ENVIRONMENT",
        "production",
        optional_text,
        "Sentry's environment",
        blank_is_unset=True,
    )
    sentry_release: str | None = setting(
        "SENTRY_RELEASE",
        "",
        optional_text,
        "Sentry's release",
        documented="fleet-payouts@<version>",
    )
    # SPEC section 3: every event is POSTed there, signed with the secret. None: off.
    webhook_url: str | None = setting(
        "WEBHOOK_URL",
        "",
        url("http", "https"),
        "every payout event is also POSTed there",
        documented="off",
    )
    # The HMAC key consumers verify signatures with: as hard to guess as a token.
    webhook_secret: Secret | None = setting(
        "WEBHOOK_SECRET",
        "",
        key(16),
        "the HMAC key of the X-Fleet-Payouts-Signature header",
        required=True,
        only_with="WEBHOOK_URL",
        secret=True,
        documented="— (required with WEBHOOK_URL, 16+ chars)",
    )
    # SPEC section 3: events older than this are deleted (410 cursor_expired).
    events_retention_days: float = setting(
        "EVENTS_RETENTION_DAYS",
        "90",
        number,
        "events older than this are deleted",
        minimum=MIN_RETENTION_DAYS,
        maximum=MAX_RETENTION_DAYS,
    )
    # The breaker opens after this many transient Billing failures in a row
    # (all hosts together). Ten is well past the odd lost answer, and still
    # only seconds of calls into an outage at BILLING_RPS.
    billing_breaker_failures: int = count(
        "BILLING_BREAKER_FAILURES",
        "10",
        "transient Billing failures in a row that open the breaker",
    )
    # An open breaker pauses every call this long before one probe call tries
    # Billing again: long enough not to hammer a Billing that is restarting.
    billing_breaker_cooloff_seconds: float = seconds(
        "BILLING_BREAKER_COOLOFF_SECONDS", "30", "how long an open breaker pauses every call"
    )
    # SPEC section 9: the support console at /console, off unless a secret signs its
    # sessions: they act with an admin's rights, so a short one could be guessed.
    console_secret: Secret | None = setting(
        "CONSOLE_SECRET",
        "",
        key(32),
        "turns on the support console and signs its session cookies",
        secret=True,
        documented="off (dev sets one)",
    )
    # Eight hours is one shift: a session never outlives the person's day.
    console_session_hours: float = setting(
        "CONSOLE_SESSION_HOURS",
        "8",
        number,
        "how long a console sign-in lasts",
        above=0,
        maximum=MAX_SESSION_HOURS,
    )
    # The key page cursors are signed with (service/web/cursors.py); None: derived from
    # the tokens. The same on every host, or cursors fail from one host to the next.
    cursor_secret: Secret | None = setting(
        "CURSOR_SECRET",
        "",
        key(16),
        "the key page cursors are signed with",
        secret=True,
        documented="derived from the tokens",
    )
    # The HTTP edge (service/web/edge.py). Open connections beyond this are answered 503:
    # each may hold ~100 kB of buffers, so 1000 bound that at ~100 MB, and three hosts
    # behind a load balancer that reuses its connections never need as many.
    api_max_connections: int = count(
        "API_MAX_CONNECTIONS", "1000", "open connections per API process"
    )
    # A request's head, then its body (16 KiB at most), must arrive within these: any
    # real client sends them in milliseconds; a slowloris is cut off at once.
    api_header_timeout_seconds: float = seconds(
        "API_HEADER_TIMEOUT_SECONDS", "10", "a request's head must arrive within this"
    )
    api_body_timeout_seconds: float = seconds(
        "API_BODY_TIMEOUT_SECONDS", "10", "a request's body must arrive within this"
    )
    # An idle keep-alive connection closes after this (a front proxy's upstream
    # keep-alive must be shorter, see ops/proxy/).
    api_keep_alive_seconds: float = seconds(
        "API_KEEP_ALIVE_SECONDS", "5", "an idle keep-alive connection closes after this"
    )


def variables() -> dict[str, Variable]:
    """Every declared setting: Settings field name → its Variable, in declaration order."""
    return {f.name: f.metadata["variable"] for f in dataclasses.fields(Settings)}


def database_url(env: Mapping[str, str]) -> str:
    """Only DATABASE_URL, for commands that need nothing else (migrate, parks import)."""
    variable = variables()["database_url"]
    value: Secret = variable.read(env, required=True)
    return value.reveal()


def load(env: Mapping[str, str], *, require_database: bool = True) -> Settings:
    """Build Settings from an environment mapping, or raise ConfigError."""
    declared = variables()
    values: dict[str, Any] = {}
    for field, variable in declared.items():
        required = variable.required and (require_database or variable.name != "DATABASE_URL")
        values[field] = variable.read(env, required=required)
    if values["database_url"] is None:
        values["database_url"] = Secret("")  # require_database=False and none given
    by_name = {variable.name: field for field, variable in declared.items()}
    for field, variable in declared.items():
        if variable.at_most is None:
            continue
        limit = values[by_name[variable.at_most]]
        if values[field] > limit:
            raise ConfigError(variable.name, f"must not exceed {variable.at_most} ({limit})")
    return Settings(**values)


def secret_values(settings: Settings) -> tuple[str, ...]:
    """The text of every secret setting, and the database password on its own: what a
    scrubber (Sentry's before_send) cuts out of any string that still carries one."""
    found: list[str] = []
    for field in variables():
        value = getattr(settings, field)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Secret) and item.reveal():
                found.append(item.reveal())
    password = urllib.parse.urlsplit(settings.database_url.reveal()).password
    if password:
        found.append(password)
        found.append(urllib.parse.unquote(password))
    # Longest first, so a URL goes whole before its password; a text of a few characters
    # is left alone: cutting "pw" out of every string would leave events unreadable.
    kept = sorted({text for text in found if len(text) >= MIN_SCRUBBED}, key=len, reverse=True)
    return tuple(kept)


MIN_SCRUBBED = 4
