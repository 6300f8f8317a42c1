# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck pytest demo bench bench-instructions record clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check $(wildcard src tests benchmarks examples scripts)
	$(BIN)/ruff format --check src

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: install
	$(BIN)/rag-resilience demo $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/langchain_overhead.py
	$(BIN)/python benchmarks/stores.py
	$(BIN)/python benchmarks/chaos_throughput.py
	$(BIN)/python benchmarks/chaos.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/deadline.py

# Deterministic instruction counts (valgrind callgrind), about 5 min; needs valgrind.
bench-instructions: install
	$(BIN)/python benchmarks/instructions.py

record: install
	$(BIN)/python scripts/record_cassettes.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
