"""Issue 16's changes attacked from outside (attack16): secrets in what the real processes print
when the configuration is wrong, and hostile input on the paths the change rewrote."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ADMIN_TOKEN, API_TOKEN
from tests.helpers.emulator import REPO_ROOT

PASSWORD = "s3cr%ZZetPW"
DSN_KEY = "SENTRYKEYabc0123"


def run_cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` with a complete configuration plus `env`; its output merged."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "DATABASE_"))}
    full = {
        **base,
        "BILLING_URL": "http://127.0.0.1:9",
        "API_TOKENS": API_TOKEN,
        "ADMIN_TOKENS": ADMIN_TOKEN,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=full,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", [["migrate"], ["serve", "--port", "21790"], ["worker"]])
def test_password_libpq_cannot_parse_is_refused_without_its_text(command: list[str]) -> None:
    """A DATABASE_URL whose password holds a stray `%` (libpq's refusal quotes the token: the
    password) stops the command as a configuration error naming the variable, never printing
    the password (before: migrate printed it, serve and worker logged it on every retry)."""
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:1/payouts"
    try:
        done = run_cli(*command, timeout=15, DATABASE_URL=url)
    except subprocess.TimeoutExpired as exc:
        printed = (exc.stdout or b"") + (exc.stderr or b"")
        text = printed.decode() if isinstance(printed, bytes) else printed
        pytest.fail(f"{command} kept running on a bad DATABASE_URL: {text[-600:]}")
    output = done.stdout + done.stderr
    assert 2 == done.returncode, output
    assert "configuration error: DATABASE_URL" in output
    assert "s3cr" not in output


@pytest.mark.parametrize(
    "dsn",
    [
        f"https://{DSN_KEY}@sentry.example",
        f"https://{DSN_KEY}@sentry.example/not-a-number",
        f"https://{DSN_KEY}@sentry.example:99999/1",
    ],
)
def test_malformed_sentry_dsn_is_a_configuration_error(dsn: str) -> None:
    """A SENTRY_DSN Sentry's client refuses (no project, a non-numeric one, a port out of range)
    is a configuration error naming the variable, not a start-up traceback, and its key is not
    printed."""
    done = run_cli(
        "serve", "--port", "21791", DATABASE_URL="postgresql://app@127.0.0.1:1/x", SENTRY_DSN=dsn
    )
    output = done.stdout + done.stderr
    assert 2 == done.returncode, output
    assert "configuration error: SENTRY_DSN" in output
    assert "Traceback" not in output
    assert DSN_KEY not in output
