# zapbus developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages: needed to run (local NATS/Postgres when none answers) and by the tests.
SYSTEM_PKGS ?= nats-server postgresql
SYSTEM_PKGS_TEST ?= chromium prometheus
PYTEST_ARGS ?=
RUN_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv deps-system run test lint bench soak clean

venv: $(VENV)/.installed

# Re-installs when pyproject.toml changes; a no-op otherwise.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

deps-system:
	@bash scripts/deps-system.sh $(SYSTEM_PKGS) $(SYSTEM_PKGS_TEST)

run: venv
	$(BIN)/zapbus run $(RUN_ARGS)

test: deps-system venv
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory lint

# Both checks run even when the first fails; fails if either does.
lint: venv
	@status=0; \
	echo "$(BIN)/ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || status=1; \
	exit $$status

# The seeded fault-schedule soak: `make soak SEED=7 STEPS=80` replays one schedule;
# `make soak MINUTES=30` runs random seeds for that long and prints any failing seed.
SEED ?=
STEPS ?= 60
MINUTES ?= 0
soak: deps-system venv
	$(BIN)/python -m tests.soak $(if $(SEED),--seed $(SEED)) --steps $(STEPS) --minutes $(MINUTES)

bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	@# stop a postgres that `zapbus run` left running in .zapbus/pg before deleting its data
	@if [ -f .zapbus/pg/data/postmaster.pid ] && [ -x $(BIN)/python ]; then \
	  $(BIN)/python -c 'from pathlib import Path; from zapbus.localinfra import PostgresServer; PostgresServer(Path(".zapbus/pg")).stop()'; \
	fi
	rm -rf $(VENV) .zapbus
