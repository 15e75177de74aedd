import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fleet_payouts_devkit.postgres import EmbeddedPostgres


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: pytest's basetemp parents are 0700 root, which the postgres account cannot
    # traverse when the suite runs as root.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="pgembed-test-"))
    base.chmod(0o755)
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_fresh_server_answers_and_preloads_pg_stat_statements(data_dir: Path) -> None:
    """A server started in an empty directory answers queries and preloads pg_stat_statements."""
    with EmbeddedPostgres(data_dir, fast_unsafe=True) as pg, psycopg.connect(pg.url) as conn:
        one = conn.execute("select 1").fetchone()
        preload = conn.execute("show shared_preload_libraries").fetchone()

    assert (1,) == one
    assert preload is not None
    assert "pg_stat_statements" in preload[0].split(", ")


def test_restart_keeps_data_and_port(data_dir: Path) -> None:
    """Stopping and starting again on the same data dir keeps its tables and its port."""
    pg = EmbeddedPostgres(data_dir, fast_unsafe=True)
    try:
        first_url = pg.start()
        with psycopg.connect(first_url) as conn:
            conn.execute("create table kept (id int)")
            conn.execute("insert into kept values (42)")
        pg.stop()
        pg.stop()  # idempotent

        second_url = EmbeddedPostgres(data_dir, fast_unsafe=True).start()
        with psycopg.connect(second_url) as conn:
            rows = conn.execute("select id from kept").fetchall()
    finally:
        pg.stop()

    assert first_url == second_url
    assert [(42,)] == rows
