"""Dependencies point one way: the edges load the use cases they serve, and nothing more."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

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
        "service.payouts.execution",
        "service.worker.tasks",
        "service.worker.run",
        "service.payouts.periodic",
        "service.ops.maintenance",
    }


# service/'s packages from the bottom up: each may import only the packages before it
# (and itself). web/ and worker/ are the two edges and never import each other; cli.py
# and __main__ sit on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("audit",),
    ("parks",),
    ("billing",),
    ("payouts",),
    ("events", "support"),
    ("ops",),
    ("web", "worker"),
    ("cli",),
    ("__main__",),
)


def imported_packages(path: Path) -> set[str]:
    """The service packages a module names in any import, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "service":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "service" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    """No module of service/ imports a package of its own layer or a layer above it:
    core/ knows no payout, payouts/ no ops, web, worker or CLI, and web/ and worker/
    never each other (a new package must be placed in LAYERS)."""
    rank = {package: level for level, packages in enumerate(LAYERS) for package in packages}
    offenders = []
    for path in sorted((REPO_ROOT / "service").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT / "service").parts
        package = parts[0] if len(parts) > 1 else path.stem
        if package == "__init__":
            continue
        assert package in rank, f"{package} is in no layer of LAYERS"
        for used in imported_packages(path) - {package}:
            if rank.get(used, len(LAYERS)) >= rank[package]:
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports service.{used}")
    assert [] == offenders


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
