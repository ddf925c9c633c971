# The project's interface: README's commands are these targets, and .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test lint format clean soak browser bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever the dependencies change.
$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# The live page's tests drive Debian's Chromium (Playwright never downloads a browser here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium at $(CHROMIUM) (or set CHROMIUM=…): the browser tests need it"; exit 1; }
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium \
	  || { DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

browser: $(CHROMIUM)

## Run the whole stack (embedded Redis/Postgres unless REDIS_URL/DATABASE_URL are set) and a first job.
dev: install
	$(BIN)/conveyor dev

## Lint, then the whole test suite against real servers and real workers.
test: install lint browser
	CHROMIUM=$(CHROMIUM) $(BIN)/pytest

## Rules checked by tools: style, types (strict on the client and the runtime), import layering.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

## Not in CI: Conveyor beside plain Celery (defaults and tuned), Dramatiq and huey on one
## embedded Valkey; prints the table, writes bench/results/compare.{md,json,png} (~8 min).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.compare --profile

## Not in CI: 100,000 mixed jobs through real workers with faults injected at random (bench/soak.py).
soak: install
	$(BIN)/python -m bench.soak

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
