"""Everything `fleet-payouts dev` needs and production never loads.

- run.py: the `dev` command (embedded database, migrations, emulator, API, worker);
- postgres.py: a local PostgreSQL server over a private data directory (dev, tests, bench);
- processes.py: the one copy of the port, wait and stop helpers that dev, the
  test suite and the benchmark share.
"""
