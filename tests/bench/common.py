"""What the benchmarks share: where their PostgreSQL comes from."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def bench_server(workdir: Path) -> Iterator[str]:
    """BENCH_DATABASE_URL if set, else an embedded server in `workdir` (fsync off); its URL."""
    given = os.environ.get("BENCH_DATABASE_URL", "").strip()
    if given:
        yield given
        return
    from fleet_payouts_devkit.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres(workdir / "pg", fast_unsafe=True)
    try:
        yield pg.start()
    finally:
        pg.stop()
