"""ops/: the Prometheus rules load and pass their unit tests; Alertmanager's routing loads."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers.emulator import REPO_ROOT

RULES = REPO_ROOT / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=600, check=False
    )


@needs_promtool
def test_rule_files_are_valid() -> None:
    """`promtool check rules` accepts the recording and alert rules."""
    result = promtool("check", "rules", "recording_rules.yml", "alert_rules.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    """`promtool test rules` passes: alerts fire when and only when their tests say."""
    result = promtool("test", "rules", "rules_test.yml", "rules_test_checks.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    """`promtool check config` accepts prometheus.yml (scrapes, rule files, Alertmanager)."""
    result = promtool("check", "config", "prometheus.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(
    AMTOOL is None,
    reason="amtool not installed (Debian: apt-get install prometheus-alertmanager)",
)
def test_alertmanager_config_is_valid() -> None:
    """`amtool check-config` accepts the Alertmanager routing and receivers."""
    assert AMTOOL is not None
    config = REPO_ROOT / "ops" / "alertmanager" / "alertmanager.yml"
    result = subprocess.run(
        [AMTOOL, "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
