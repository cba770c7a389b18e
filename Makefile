# The README's two commands: `make run` and `make test`. Each does all of its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint sysdeps jars bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

sysdeps:
	bash scripts/system-deps.sh

jars: $(STAMP)
	$(PY) -m shared.infra jars

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## Start Kafka, Redis, the three services and simulated agents; Ctrl-C stops everything.
run: sysdeps $(STAMP) jars
	$(PY) -m shared.devstack

## The whole suite on the real Kafka and Redis (plus lint and mypy).
test: sysdeps $(STAMP) jars lint
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

## Benchmarks (reduced sizes; BENCH_ARGS=--full for the issue's sizes): JSON report + table.
bench: sysdeps $(STAMP) jars
	$(PY) -m bench $(BENCH_ARGS)

## Fault injection (reduced; CHAOS_ARGS=--full): lost / wrong / duplicates per scenario, all must be 0.
chaos: sysdeps $(STAMP) jars
	$(PY) -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
