# skyvault: `make demo` runs the pipeline on the embedded default; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(PYTHON) -m uv
RUN := $(UV) run --frozen
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo ui serve test setup setup-python setup-system lint typecheck pytest bench clean

demo: setup-python ## make sample products and run ingest on local folders + a static catalog
	PREFECT_HOME=$(CURDIR)/skyvault-data/prefect $(RUN) python -m skyvault.demo

UI_PORT ?= 4200

ui: setup-python ## the Prefect UI on the demo's runs (PREFECT_HOME=skyvault-data/prefect), on 127.0.0.1
	@echo "Prefect UI on the demo's runs: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	PREFECT_HOME=$(CURDIR)/skyvault-data/prefect $(RUN) prefect server start --host 127.0.0.1 --port $(UI_PORT)

SERVE_PORT ?= 8600
DEMO := $(CURDIR)/skyvault-data/demo

serve: setup-python ## the gateway with its map on the demo's data (after make demo), on 127.0.0.1
	@test -f $(DEMO)/skyvault.yaml || { echo "serve: no demo data yet, run make demo first" >&2; exit 1; }
	@test -s $(DEMO)/gateway-password || (umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(18))" > $(DEMO)/gateway-password)
	@echo "Map of the demo's tiles and items: http://127.0.0.1:$(SERVE_PORT)/map  (Ctrl-C stops it)"
	@echo "API user 'demo', password in $(DEMO)/gateway-password; run links open make ui's address"
	PREFECT_HOME=$(CURDIR)/skyvault-data/prefect PREFECT_UI_URL=http://127.0.0.1:$(UI_PORT) \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 \
	SKYVAULT_CONFIG_FILE=$(DEMO)/skyvault.yaml SKYVAULT_GATEWAY__USERNAME=demo \
	SKYVAULT_GATEWAY__PASSWORD_FILE=$(DEMO)/gateway-password \
	$(RUN) skyvault-api --host 127.0.0.1 --port $(SERVE_PORT)

test: setup-system setup-python lint typecheck pytest ## set up everything and pass the whole suite

setup: setup-system setup-python

setup-system: ## system packages the suite (PostgreSQL, Docker, debootstrap) and the benchmarks use (Debian)
	@bash scripts/setup-system.sh

setup-python: ## the locked Python environment in .venv, and the map page's Leaflet (npm registry)
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	@# bytecode compiled at install: every process (the CLI, each flow run, the tests' children)
	@# starts from it instead of compiling its imports again, also where PYTHONDONTWRITEBYTECODE is set
	$(UV) sync --frozen --compile-bytecode
	@$(UV) run --frozen python -m compileall -q skyvault
	@bash scripts/fetch-web-assets.sh

lint:
	$(RUN) ruff check skyvault tests bench
	$(RUN) ruff format --check skyvault tests bench

typecheck:
	$(RUN) mypy skyvault tests bench

pytest:
	$(RUN) pytest -q

bench: setup ## compare against the reference tools; tables go to bench/out/ for docs/benchmarks.md
	$(RUN) python -m bench.preprocess --database postgres
	$(RUN) python -m bench.seed --database postgres
	$(RUN) python -m bench.archive --database postgres
	$(RUN) python -m bench.ingest --database sqlite
	$(RUN) python -m bench.ingest --database postgres
	$(RUN) python -m bench.ingest --database postgres --products 1000
	$(RUN) python -m bench.register
	$(RUN) python -m bench.gateway --database postgres
	$(RUN) python -m bench.series --database postgres

clean:
	rm -rf skyvault-data .pytest_cache .mypy_cache .ruff_cache
