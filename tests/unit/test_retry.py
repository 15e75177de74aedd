"""The one back-off (service/core/retry.py): its formula, and that it stays the only one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from service.core import retry
from tests.helpers.emulator import REPO_ROOT

SERVICE = REPO_ROOT / "service"
RETRY_MODULE = SERVICE / "core" / "retry.py"


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "expected"),
    [
        (0, 1.0, 60.0, 1.0),
        (3, 1.0, 60.0, 8.0),
        (10, 1.0, 60.0, 60.0),
        (10_000, 1.0, 60.0, 60.0),
        (-1, 1.0, 60.0, 1.0),
        (2, 0.25, 5.0, 1.0),
        (9, 0.25, 5.0, 5.0),
    ],
)
def test_the_delay_is_exponential_capped_and_jittered(
    attempt: int, base: float, cap: float, expected: float
) -> None:
    """min(cap, base * 2^attempt) within +/-25 % jitter, for any attempt count."""
    for _ in range(50):
        got = retry.delay(attempt, base=base, cap=cap)
        assert expected * 0.75 <= got <= expected * 1.25


def test_the_jitter_spreads_callers_that_failed_together() -> None:
    """Twenty callers at the same attempt do not all wait the same time."""
    assert 1 < len({retry.delay(4, cap=60.0) for _ in range(20)})


def test_retry_after_wins_over_a_shorter_backoff_only() -> None:
    """A 30 s Retry-After outlasts a 1 s back-off; a 0.1 s one does not shorten an 8 s one."""
    assert 30.0 == retry.delay(0, cap=1.0, retry_after=30.0)
    assert 6.0 <= retry.delay(3, cap=60.0, retry_after=0.1) <= 10.0


def computed_powers(path: Path) -> list[int]:
    """Lines of `x ** y` with a non-constant exponent: an exponential of something."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and not isinstance(node.right, ast.Constant)
    ]


def imports_random(path: Path) -> bool:
    """Whether a module imports the `random` module (the jitter's source)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "random" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            return True
    return False


def test_no_other_backoff_formula_in_service() -> None:
    """No module of service/ but core/retry.py computes an exponential or draws a jitter."""
    others = [p for p in sorted(SERVICE.rglob("*.py")) if p != RETRY_MODULE]
    assert [] == [
        f"{p.relative_to(REPO_ROOT)}:{line}" for p in others for line in computed_powers(p)
    ]
    assert [] == [str(p.relative_to(REPO_ROOT)) for p in others if imports_random(p)]
    assert computed_powers(RETRY_MODULE)
    assert imports_random(RETRY_MODULE)
