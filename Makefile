# sfx-live: the two commands a new user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON_FOR_VENV ?= python3.11

.PHONY: install servers test lint format demo bench schemas clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

servers:
	bash scripts/ensure-servers.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install servers lint
	$(BIN)/pytest -q

demo: install servers
	$(BIN)/sfx demo

bench: install servers
	$(PY) -m benchmarks

schemas: install
	$(BIN)/sfx schemas --out docs/schemas

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
