# Two commands: `make demo` (every tiny asset set of medtune.testing.demo_assets into assets/<name>,
# then the demo run into outputs/demo) and `make test`. Each creates .venv and installs medtune (editable,
# with the dev extra) when the venv is missing or pyproject.toml changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-installed
ASSETS := assets
# Tests use both cores of the CI machine; override with `make test PYTEST_ARGS=...`. A test
# module stays on one worker (--dist loadscope): its module-scoped fixtures (tiny training runs,
# servers) then run once, not once per worker. The ten slowest tests are listed at the end.
PYTEST_ARGS ?= -n 2 --dist loadscope --durations=10

.PHONY: demo test lint install clean browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/make_tiny_assets.py --root $(ASSETS)
	$(BIN)/python tools/run_demo.py --assets $(ASSETS)/tiny

# Headless Chromium for tests/serve/test_page.py (Debian's package; installed only when missing).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "make browser: could not install chromium; the web page test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) assets outputs .pytest_cache .ruff_cache
