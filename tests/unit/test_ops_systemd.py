"""ops/systemd: the units start only on a migrated schema and are hardened to "OK"."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.emulator import REPO_ROOT

UNITS = REPO_ROOT / "ops" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# systemd-analyze's own bands: <= 3.0 is "OK" (1.x-2.x), 9.x-10 "UNSAFE".
MAX_EXPOSURE = 3.0


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("name", ["fleet-payouts-api.service", "fleet-payouts-worker.service"])
def test_api_and_worker_require_the_migration(name: str) -> None:
    """api and worker Require= and come After= migrate: a failed migrate keeps them down."""
    section = unit(UNITS / name)["Unit"]
    assert "fleet-payouts-migrate.service" in section.get("Requires", "").split()
    assert "fleet-payouts-migrate.service" in section.get("After", "").split()


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="no systemd-analyze (Debian: apt-get install systemd)"
)
@pytest.mark.parametrize("path", SERVICES, ids=[p.name for p in SERVICES])
def test_unit_exposure_is_ok(path: Path) -> None:
    """`systemd-analyze security --offline` rates every unit 3.0 ("OK") or better."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
