# The two commands a newcomer needs: `make dev` (the whole system) and
# `make test` (lint, types, the suite). Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup dev test lint bench drill clean

# The service with its dev tools, and the dev kit (devkit/: the emulator, the embedded
# PostgreSQL, `dev`), which the production image leaves out.
$(STAMP): pyproject.toml devkit/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e ./devkit
	touch $(STAMP)

setup: $(STAMP)

dev: $(STAMP)
	$(VENV)/bin/fleet-payouts dev

lint: $(STAMP)
	$(VENV)/bin/ruff check service devkit tests
	$(VENV)/bin/ruff format --check service devkit tests
	$(VENV)/bin/mypy

# Two pytest processes (PYTEST_WORKERS=0 for one): tests/e2e/ stays on one of them, one
# test at a time (its cases time real processes), while the other takes the rest
# (tests/conftest.py, pytest_xdist_make_scheduler).
PYTEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS))

# wrk drives the HTTP figure: a Python load generator on the same two cores
# steals the CPU it measures. Without wrk the bench falls back and says so.
bench: $(STAMP)
	command -v wrk >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		apt-get install -y -qq wrk >/dev/null 2>&1) || echo "wrk not installed"
	$(PY) -m tests.bench.service
	$(PY) -m tests.bench.events
	$(PY) -m tests.bench.feed
	$(PY) -m tests.bench.billing
	$(PY) -m tests.bench.http_client
	$(PY) -m tests.bench.park_import
	$(PY) -m tests.bench.history

# The suite's two drills, each for DRILL_SECONDS: three hosts, one SIGKILLed, PostgreSQL
# restarted and crashed, Billing faults (test_drill.py); then each host cut off from
# PostgreSQL and Billing at random by fault-injecting links (test_partition_drill.py,
# DRILL_SEED=<n> replays a run's faults). Each prints its figures.
drill: $(STAMP)
	DRILL_SECONDS=$${DRILL_SECONDS:-600} $(PY) -m pytest -q \
		tests/e2e/test_drill.py tests/e2e/test_partition_drill.py

clean:
	rm -rf $(VENV) .fleet-payouts .pytest_cache .mypy_cache .ruff_cache *.egg-info
