"""The audit benchmark (tests/bench/audit.py) still runs end to end at a tiny scale; its
figures are not checked here, only that each is printed and that the data it generates
verifies (figure 3 fails loudly otherwise)."""

from __future__ import annotations

import pytest

from tests.bench import audit as audit_bench


def test_audit_bench_prints_every_figure(
    pg_server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`main` at 3,000 entries over 3 months exits 0 and prints figures 1, 2 and 3."""
    code = audit_bench.main(
        ["--scale", "3000", "--months", "3", "--seconds", "0.3", "--database-url", pg_server_url]
    )
    out = capsys.readouterr().out
    assert 0 == code, out
    for figure in ("[1] one park's latest 50 entries", "[2] chained inserts", "[3] audit verify"):
        assert figure in out, out
