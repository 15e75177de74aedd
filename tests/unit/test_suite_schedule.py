"""The suite's own schedule (tests/conftest.py): which end-to-end files may share the CPUs."""

from __future__ import annotations

from tests.conftest import E2E_SHARING
from tests.helpers.emulator import REPO_ROOT


def test_every_sharing_end_to_end_file_exists() -> None:
    """E2E_SHARING names only files in tests/e2e/: a renamed file cannot leave a stale name."""
    assert [] == sorted(p for p in E2E_SHARING if not (REPO_ROOT / p).is_file())
