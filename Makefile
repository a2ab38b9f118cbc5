# skyvault: `make demo` runs the pipeline on the embedded default; `make test` runs the whole suite.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
RUN := $(UV) run --frozen

.PHONY: demo test setup setup-python setup-system lint typecheck pytest bench clean

demo: setup ## make sample products and run ingest on local folders + a static catalog
	$(RUN) python -m skyvault.demo

test: setup lint typecheck pytest ## set up everything and pass the whole suite

setup: setup-system setup-python

setup-system: ## system packages the suite and the benchmarks use (Debian)
	@bash scripts/setup-system.sh

setup-python: ## the locked Python environment in .venv
	@command -v uv >/dev/null 2>&1 || [ -x "$(UV)" ] || python3 -m pip install --quiet --user "uv==0.13.9" || python3 -m pip install --quiet "uv==0.13.9"
	$(UV) sync --frozen

lint:
	$(RUN) ruff check skyvault tests bench
	$(RUN) ruff format --check skyvault tests bench

typecheck:
	$(RUN) mypy skyvault tests bench

pytest:
	$(RUN) pytest -q

bench: setup ## compare against the reference tools; prints a table for docs/benchmarks.md
	$(RUN) python -m bench.run

clean:
	rm -rf skyvault-data .pytest_cache .mypy_cache .ruff_cache
