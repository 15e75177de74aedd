"""service/core/settings.py: defaults from SPEC section 5, and refusals that name the variable."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import logging
import re
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest

from service.core import observability
from service.core import settings as settings_module
from service.core.settings import ConfigError, Secret, Settings, load, variables
from tests.conftest import TEST_ENV, make_settings, service_env
from tests.helpers.emulator import REPO_ROOT

BASE = {
    "DATABASE_URL": "postgresql://fp:db-secret-pw@127.0.0.1:5432/fleet",
    "BILLING_URL": "http://127.0.0.1:8081",
}


def env(**overrides: str) -> dict[str, str]:
    return {**BASE, **overrides}


def test_defaults_follow_the_spec() -> None:
    """With only the two URLs set, every tunable takes its SPEC section 5 default."""
    s = load(BASE)
    assert timedelta(days=7) == s.payout_period
    assert timedelta(hours=24) == s.instant_cooldown
    assert Decimal("100000.00") == s.payout_max_amount
    assert 10 == s.billing_rps
    assert (10, 30.0) == (s.billing_breaker_failures, s.billing_breaker_cooloff_seconds)
    assert "*/5 * * * *" == s.periodic_scan_cron
    assert "INFO" == s.log_level
    assert s.billing_token is None
    assert s.sentry_dsn is None
    assert () == s.api_tokens
    assert () == s.admin_tokens
    assert BASE["DATABASE_URL"] == s.database_url
    assert BASE["BILLING_URL"] == s.billing_url


def test_fractional_period_and_cooldown_are_accepted() -> None:
    """N and K accept fractions, so tests can run with seconds-long periods."""
    s = load(env(PAYOUT_PERIOD_DAYS="0.0001", INSTANT_PAYOUT_COOLDOWN_HOURS="0.001"))
    assert timedelta(days=0.0001) == s.payout_period
    assert timedelta(hours=0.001) == s.instant_cooldown


def test_six_field_cron_with_seconds_is_accepted() -> None:
    """A six-field cron expression (seconds field included) is a valid PERIODIC_SCAN_CRON."""
    s = load(env(PERIODIC_SCAN_CRON="* * * * * */10"))
    assert "* * * * * */10" == s.periodic_scan_cron


def test_tokens_are_split_on_commas() -> None:
    """API_TOKENS and ADMIN_TOKENS are comma-separated lists, surrounding blanks ignored."""
    s = load(
        env(
            API_TOKENS="api-token-aaaaaaaaaaaa, api-token-bbbbbbbbbbbb",
            ADMIN_TOKENS="admin-token-cccccccccc",
        )
    )
    assert (Secret("api-token-aaaaaaaaaaaa"), Secret("api-token-bbbbbbbbbbbb")) == s.api_tokens
    assert (Secret("admin-token-cccccccccc"),) == s.admin_tokens


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYOUT_PERIOD_DAYS", "abc"),
        ("PAYOUT_PERIOD_DAYS", "-1"),
        ("PAYOUT_PERIOD_DAYS", "0"),
        ("PAYOUT_PERIOD_DAYS", "nan"),
        ("PAYOUT_PERIOD_DAYS", "inf"),
        ("INSTANT_PAYOUT_COOLDOWN_HOURS", "x"),
        ("PAYOUT_MAX_AMOUNT", "-5"),
        ("PAYOUT_MAX_AMOUNT", "1.234"),
        ("PAYOUT_MAX_AMOUNT", "abc"),
        ("BILLING_RPS", "0"),
        ("BILLING_BREAKER_FAILURES", "0"),
        ("BILLING_BREAKER_FAILURES", "2.5"),
        ("BILLING_BREAKER_COOLOFF_SECONDS", "-1"),
        ("PERIODIC_SCAN_CRON", "not a cron"),
        ("PERIODIC_SCAN_CRON", "* * *"),
        ("BILLING_URL", "ftp://x"),
        ("BILLING_URL", "http://"),
        ("DATABASE_URL", "mysql://x"),
        ("LOG_LEVEL", "LOUD"),
        # Absurd but numeric: centuries overflow time arithmetic (a 500 once).
        ("INSTANT_PAYOUT_COOLDOWN_HOURS", "1e8"),
        ("PAYOUT_PERIOD_DAYS", "36500"),
        ("BILLING_RETRY_WINDOW_HOURS", "1e6"),
        ("BILLING_RPS", "1e9"),
        ("PAYOUT_MIN_AMOUNT", "0"),
        ("PAYOUT_MIN_AMOUNT", "200000.00"),
        ("API_POOL_MAX_SIZE", "0"),
        ("API_POOL_MAX_SIZE", "ten"),
        ("API_POOL_MIN_SIZE", "20"),
        ("API_POOL_TIMEOUT_SECONDS", "0"),
        ("API_STATEMENT_TIMEOUT_SECONDS", "-1"),
        ("API_LOCK_TIMEOUT_SECONDS", "soon"),
        ("ADMIN_POOL_MAX_SIZE", "1.5"),
        ("ADMIN_STATEMENT_TIMEOUT_SECONDS", "nan"),
        ("API_DRAIN_SECONDS", "-1"),
        ("TRUSTED_PROXIES", "10.0.0.1,lb.example"),
        ("CURSOR_SECRET", "short"),
        ("API_MAX_CONNECTIONS", "0"),
        ("API_HEADER_TIMEOUT_SECONDS", "0"),
        ("API_BODY_TIMEOUT_SECONDS", "never"),
        ("API_KEEP_ALIVE_SECONDS", "-5"),
        ("EVENTS_RETENTION_DAYS", "3"),
        ("EVENTS_RETENTION_DAYS", "1e6"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(variable: str, value: str) -> None:
    """A malformed value stops start-up with a ConfigError whose message names the variable."""
    with pytest.raises(ConfigError) as info:
        load(env(**{variable: value}))
    assert variable == info.value.variable
    assert variable in str(info.value)


def test_edge_settings_have_defaults_and_parse() -> None:
    """Pool, timeout, drain and proxy settings default sensibly and parse what operators write."""
    assert (2, 10, 2.0, 3.0, 1.0, 2, 5.0, 5.0, ()) == _edge(load(BASE))
    s = load(
        env(
            API_POOL_MIN_SIZE="1",
            API_POOL_MAX_SIZE="4",
            API_POOL_TIMEOUT_SECONDS="0.5",
            API_STATEMENT_TIMEOUT_SECONDS="1.5",
            API_LOCK_TIMEOUT_SECONDS="0.2",
            ADMIN_POOL_MAX_SIZE="1",
            ADMIN_STATEMENT_TIMEOUT_SECONDS="30",
            API_DRAIN_SECONDS="0",
            TRUSTED_PROXIES="10.0.0.0/8, 192.168.1.7,::1",
        )
    )
    networks = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.7/32", "::1/128"))
    assert (1, 4, 0.5, 1.5, 0.2, 1, 30.0, 0.0, networks) == _edge(s)


def _edge(s: Settings) -> tuple[object, ...]:
    return (
        s.api_pool_min_size,
        s.api_pool_max_size,
        s.api_pool_timeout_seconds,
        s.api_statement_timeout_seconds,
        s.api_lock_timeout_seconds,
        s.admin_pool_max_size,
        s.admin_statement_timeout_seconds,
        s.api_drain_seconds,
        s.trusted_proxies,
    )


@pytest.mark.parametrize("variable", ["BILLING_URL", "DATABASE_URL"])
def test_missing_url_raises_config_error_naming_the_variable(variable: str) -> None:
    """DATABASE_URL and BILLING_URL are required: without one, ConfigError names it."""
    values = dict(BASE)
    del values[variable]
    with pytest.raises(ConfigError) as info:
        load(values)
    assert variable == info.value.variable
    assert variable in str(info.value)


@pytest.mark.parametrize("variable", ["API_TOKENS", "ADMIN_TOKENS"])
def test_short_token_is_refused_without_echoing_it(variable: str) -> None:
    """A too-short token is a ConfigError naming the variable but never the token itself."""
    short = "tok3n-x"
    with pytest.raises(ConfigError) as info:
        load(env(**{variable: f"long-enough-token-0123456789,{short}"}))
    assert variable == info.value.variable
    assert variable in str(info.value)
    assert short not in str(info.value)


def test_repr_never_contains_secrets() -> None:
    """repr/str of Settings shows no API, admin or Billing token, nor the database password."""
    secrets = {
        "API_TOKENS": "api-secret-token-111111",
        "ADMIN_TOKENS": "admin-secret-token-22222",
        "BILLING_TOKEN": "billing-secret-token-333",
    }
    s = load(env(**secrets))
    assert (Secret(secrets["API_TOKENS"]),) == s.api_tokens  # the tokens were really loaded
    for text in (repr(s), str(s), f"{s}"):
        for secret in [*secrets.values(), "db-secret-pw"]:
            assert secret not in text


def test_serve_with_bad_setting_exits_non_zero_naming_the_variable() -> None:
    """`fleet-payouts serve` with PAYOUT_PERIOD_DAYS=abc exits quickly, non-zero, naming it."""
    child_env = service_env(
        "postgresql://postgres@127.0.0.1:1/nowhere",
        "http://127.0.0.1:9",
        PAYOUT_PERIOD_DAYS="abc",
    )
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=child_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 0 != result.returncode
    assert "PAYOUT_PERIOD_DAYS" in result.stderr


def test_http_edge_limits_default_and_parse() -> None:
    """The HTTP edge's limits default to 1000 connections, 10 s head and body timeouts and a
    5 s keep-alive, and CURSOR_SECRET to none (derived from the tokens); all parse."""
    s = load(BASE)
    assert (1000, 10.0, 10.0, 5.0, None) == (
        s.api_max_connections,
        s.api_header_timeout_seconds,
        s.api_body_timeout_seconds,
        s.api_keep_alive_seconds,
        s.cursor_secret,
    )
    s = load(
        env(
            API_MAX_CONNECTIONS="50",
            API_HEADER_TIMEOUT_SECONDS="2.5",
            API_BODY_TIMEOUT_SECONDS="3",
            API_KEEP_ALIVE_SECONDS="4",
            CURSOR_SECRET="cursor-secret-0123456789",
        )
    )
    assert (50, 2.5, 3.0, 4.0, Secret("cursor-secret-0123456789")) == (
        s.api_max_connections,
        s.api_header_timeout_seconds,
        s.api_body_timeout_seconds,
        s.api_keep_alive_seconds,
        s.cursor_secret,
    )
    assert "cursor-secret" not in repr(s)


def test_manual_payout_approval_hours_defaults_to_72_and_takes_fractions() -> None:
    """MANUAL_PAYOUT_APPROVAL_HOURS is 72 by default; fractions are accepted."""
    assert timedelta(hours=72) == load(env()).manual_payout_approval_window
    assert (
        timedelta(hours=0.5)
        == load(env(MANUAL_PAYOUT_APPROVAL_HOURS="0.5")).manual_payout_approval_window
    )


@pytest.mark.parametrize("value", ["0", "-1", "x", "1e9"])
def test_a_bad_manual_payout_approval_window_names_the_variable(value: str) -> None:
    """A non-positive, malformed or absurd MANUAL_PAYOUT_APPROVAL_HOURS stops start-up naming it."""
    with pytest.raises(ConfigError) as err:
        load(env(MANUAL_PAYOUT_APPROVAL_HOURS=value))
    assert "MANUAL_PAYOUT_APPROVAL_HOURS" == err.value.variable


# Values a variable of some kind refuses; each declared variable must refuse one of them.
BAD_VALUES = [
    "",
    "x",
    "-1",
    "0",
    "1.234",
    "nan",
    "1e400",
    "1e12",
    "short",
    "ftp://host",
    "two words here",
    "bad\x01value",
]
# WEBHOOK_SECRET is only read with WEBHOOK_URL set.
BASE_WITH_WEBHOOK = {
    **BASE,
    "WEBHOOK_URL": "https://opteum.example/hooks",
    "WEBHOOK_SECRET": "whsec-0123456789abcdef",
}


@pytest.mark.parametrize("field", list(variables()))
def test_every_declared_variable_refuses_a_bad_value_naming_it(field: str) -> None:
    """Every declared setting refuses some malformed value with a ConfigError naming its
    variable (a free-text one at least a control character), and nothing else escapes load()."""
    variable = variables()[field]
    refused = []
    for value in BAD_VALUES:
        try:
            load({**BASE_WITH_WEBHOOK, variable.name: value})
        except ConfigError as err:
            assert variable.name == err.variable, value
            assert variable.name in str(err)
            refused.append(value)
    assert "bad\x01value" in refused
    if variable.cast is not settings_module.optional_text:
        assert [] != [v for v in refused if v != "bad\x01value"]


def _readme_defaults() -> dict[str, str]:
    """README's configuration table: variable → its default column, backticks dropped."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip().strip("`") for n in cells[0].split(" / ")]
        defaults = cells[1].replace("`", "").split(" / ")
        if len(defaults) != len(names):
            defaults = [cells[1].replace("`", "")] * len(names)
        found.update(zip(names, defaults, strict=True))
    return found


def test_readme_configuration_table_matches_the_declarations() -> None:
    """README's configuration table lists every declared variable, and no other, with the
    declared default (or the declared wording of an unset one)."""
    declared = {v.name: v.documented or v.default for v in variables().values()}
    assert declared == _readme_defaults()


def test_systemd_env_example_names_declared_variables_with_their_defaults() -> None:
    """ops/systemd/env.example names only declared variables, and shows each tunable that
    has a default at that default."""
    declared = {v.name: v for v in variables().values()}
    text = (REPO_ROOT / "ops" / "systemd" / "env.example").read_text()
    lines = re.findall(r"^#?([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE)
    assert lines
    for name, value in lines:
        assert name in declared, name
        variable = declared[name]
        if variable.default and not variable.secret:
            assert variable.default == value.strip('"'), name


# A valid value for every secret setting; the test below fails when one is added without one.
SECRET_VALUES = {
    "DATABASE_URL": "postgresql://fp:pw-db-5ecret-4411@127.0.0.1:5432/fleet",
    "BILLING_TOKEN": "billing-5ecret-4412",
    "API_TOKENS": "api-5ecret-token-4413,api-5ecret-token-4414",
    "ADMIN_TOKENS": "admin-5ecret-token-4415",
    "SENTRY_DSN": "https://key5ecret4416@sentry.invalid/1",
    "WEBHOOK_SECRET": "webhook-5ecret-4417",
    "CONSOLE_SECRET": "console-5ecret-4418-0123456789abcdef",
    "CURSOR_SECRET": "cursor-5ecret-4419",
}
SECRET_PARTS = ["pw-db-5ecret-4411", *(f"5ecret-{n}" for n in range(4412, 4420)), "key5ecret"]


def _all_secrets_set() -> Settings:
    return load({**BASE, "WEBHOOK_URL": "https://opteum.example/hooks", **SECRET_VALUES})


def test_every_secret_setting_is_held_as_a_secret() -> None:
    """Each secret variable's value (each token of a list) is a Secret that reveals the text."""
    s = _all_secrets_set()
    assert set(SECRET_VALUES) == {v.name for v in variables().values() if v.secret}
    for field, variable in variables().items():
        if variable.secret:
            value = getattr(s, field)
            items = value if isinstance(value, tuple) else (value,)
            assert all(isinstance(item, Secret) for item in items), field
            assert SECRET_VALUES[variable.name].split(",")[0] == items[0].reveal()


def test_repr_and_logged_settings_contain_no_secret_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """repr, str, format and a settings object logged as JSON or text show no part of any
    secret, the database password and the DSN's key included."""
    s = _all_secrets_set()
    logger = logging.getLogger("tests.settings")
    with caplog.at_level(logging.INFO, logger="tests.settings"):
        logger.info("settings %s %r", s, s, extra={"park_id": s.api_tokens})
        logger.info("token %s, %r, %-30s", s.billing_token, s.admin_tokens, s.webhook_secret)
    texts = [repr(s), str(s), f"{s}", f"{s.console_secret:>40}", f"{s.cursor_secret!r}"]
    for record in caplog.records:
        texts.append(observability.JsonFormatter().format(record))
        texts.append(logging.Formatter("%(message)s").format(record))
    assert "'***'" in repr(s)
    for text in texts:
        for part in SECRET_PARTS:
            assert part not in text, text


def test_sentry_scrubber_cuts_out_every_secret_setting() -> None:
    """Sentry's before_send removes every secret setting's text from any string of an event,
    the database password and the DSN on their own included."""
    s = _all_secrets_set()
    leaky = " ".join(
        [*(t.split(",")[0] for t in SECRET_VALUES.values()), "password=pw-db-5ecret-4411"]
    )
    scrub = observability._before_send(observability._secrets(s))
    event = scrub({"message": leaky, "extra": {"note": [leaky]}}, {})
    text = json.dumps(event)
    for part in SECRET_PARTS:
        assert part not in text


def test_secret_never_prints_and_compares_by_value() -> None:
    """A Secret prints as *** however it is formatted, reveals its text, equals the same
    Secret or plain text, hashes as that text, cannot be changed, and survives copies."""
    secret = Secret("s3cr3t-value-0123456789")
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>30}",
        format(secret, "<5"),
    ]
    assert ["'***'", "***", "***", "'***'", "***", "***"] == shown
    assert "s3cr3t-value-0123456789" == secret.reveal()
    assert Secret("s3cr3t-value-0123456789") == secret
    assert "s3cr3t-value-0123456789" == secret
    assert Secret("other") != secret
    assert 1 != secret
    assert hash("s3cr3t-value-0123456789") == hash(secret)
    with pytest.raises(AttributeError):
        secret._value = "changed"
    for copied in (copy.copy(secret), copy.deepcopy(secret)):
        assert "s3cr3t-value-0123456789" == copied.reveal()


def test_blank_values_keep_their_old_meaning() -> None:
    """A blank SENTRY_ENVIRONMENT is production and a blank secret is unset, while a blank
    number stops start-up; a WEBHOOK_SECRET without WEBHOOK_URL is not even read."""
    s = load(env(SENTRY_ENVIRONMENT=" ", CONSOLE_SECRET="", WEBHOOK_SECRET="short"))
    assert ("production", None, None) == (s.sentry_environment, s.console_secret, s.webhook_secret)
    with pytest.raises(ConfigError) as err:
        load(env(PAYOUT_PERIOD_DAYS=""))
    assert "PAYOUT_PERIOD_DAYS" == err.value.variable


def test_tests_settings_are_the_declared_defaults_but_for_test_env() -> None:
    """tests/conftest.make_settings differs from load()'s defaults only in TEST_ENV's fields."""
    made = make_settings(BASE["DATABASE_URL"], BASE["BILLING_URL"])
    loaded = load(BASE)
    different = {
        variables()[f.name].name
        for f in dataclasses.fields(Settings)
        if getattr(made, f.name) != getattr(loaded, f.name)
    }
    assert set(TEST_ENV) == different


def test_a_token_list_may_break_lines_after_its_commas() -> None:
    """API_TOKENS written over several lines (a YAML block) loads; a tab inside a token does not."""
    s = load(env(API_TOKENS="api-token-aaaaaaaaaaaa,\n  api-token-bbbbbbbbbbbb\n"))
    assert (Secret("api-token-aaaaaaaaaaaa"), Secret("api-token-bbbbbbbbbbbb")) == s.api_tokens
    with pytest.raises(ConfigError) as err:
        load(env(API_TOKENS="api-token-aaaa\taaaaaaaa"))
    assert "API_TOKENS" == err.value.variable


def test_every_declared_variable_has_one_line_of_help() -> None:
    """Each declaration carries a one-line help text, and its variable name is unique."""
    declared = list(variables().values())
    assert [] == [v.name for v in declared if not v.help or "\n" in v.help or len(v.help) > 100]
    assert len(declared) == len({v.name for v in declared})
