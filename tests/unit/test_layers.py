"""Dependencies point one way: the edges load the use cases they serve, and nothing more."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers.emulator import REPO_ROOT


def loaded_by(module: str) -> set[str]:
    """The service modules a fresh interpreter has loaded after importing `module`."""
    code = (
        f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('service')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_the_web_app_loads_neither_the_executor_nor_the_worker() -> None:
    """Importing the API app imports no payout executor or procrastinate worker.

    (It does load the Billing client: the instant quote of SPEC section 8 reads a
    balance, through the shared gate. It orders nothing: the executor stays out.)
    """
    loaded = loaded_by("service.web.app")
    assert "service.web.app" in loaded
    assert set() == loaded & {
        "service.execution",
        "service.worker.tasks",
        "service.worker.run",
        "service.periodic",
        "service.maintenance",
    }


def test_use_cases_never_import_an_edge() -> None:
    """The use cases and data modules load no web, worker or CLI module."""
    for module in ("service.instant", "service.execution", "service.periodic", "service.payouts"):
        edges = {m for m in loaded_by(module) if m.startswith(("service.web", "service.worker"))}
        assert set() == edges, module


def test_the_runtime_package_imports_nothing_from_the_dev_kit() -> None:
    """No module of service/ imports fleet_payouts_devkit (the emulator, the embedded
    PostgreSQL, `dev`): the production image, which leaves the dev kit out, loads all of it.
    Only the CLI names the kit, as a string, for its two dev commands."""
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / "service").rglob("*.py"))
        if re.search(r"^\s*(from|import)\s+fleet_payouts_devkit", path.read_text(), re.M)
    ]
    assert [] == offenders
