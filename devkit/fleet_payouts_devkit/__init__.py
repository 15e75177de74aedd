"""fleet-payouts' dev kit: what `fleet-payouts dev`, the tests and the benchmarks need and
production never loads (the image installs the service alone).

- dev.py: the `dev` command (embedded database, migrations, emulator, API, worker);
- emulator.py: the Billing emulator (`fleet-payouts billing-emulator`), SPEC section 4;
- postgres.py: a local PostgreSQL server over a private data directory (dev, tests, bench);
- processes.py: the one copy of the port, wait and stop helpers that dev, the
  test suite and the benchmark share.

Installed beside the service by `make setup` (`pip install -e ./devkit`).
"""
