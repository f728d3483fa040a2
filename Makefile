# sfx-live: the two commands a new user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON_FOR_VENV ?= python3.11

.PHONY: install system servers test test-fast test-faults lint format demo bench schemas clean

# Debian packages (the servers; DIALS and cctbx, which the tests cross-check against): installs only what is missing.
system:
	bash scripts/install-system-packages.sh

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

servers: system
	bash scripts/ensure-servers.sh
	bash scripts/broker-roles.sh && bash scripts/redis-roles.sh  # the role users (idempotent; dev passwords unless set)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Everything: lint, then every test (the end-to-end ones marked slow included).
test: install servers lint
	$(BIN)/pytest -q

# The edit–test loop: every test but the slow end-to-end ones, in under two minutes.
test-fast: install servers
	$(BIN)/pytest -q -m "not slow"

# The fault suite: broker, Redis, disk and process faults against the running pipeline, then a loss-audit table.
test-faults: install servers
	$(BIN)/pytest -q -ra -o addopts="" -p no:randomly tests/faults

demo: install servers
	$(BIN)/sfx demo

bench: install servers
	$(PY) -m benchmarks

schemas: install
	$(BIN)/sfx schemas --out docs/schemas

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
