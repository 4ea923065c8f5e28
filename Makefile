# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) with everything it needs when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint unit bench clean browser

# The demo installs what running featurefleet needs; the tests and benchmarks add their tools
# (linters, type checker, S3 and Kubernetes validators, benchmark data sets) and the audio extra.
$(BIN)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e .
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.installed-run
	$(BIN)/python -m pip install -e '.[test,bench,audio]'
	touch $@

demo: $(BIN)/.installed-run
	$(BIN)/featurefleet demo --output featurefleet-demo

# The browser tests look at report.html and Flower in a real headless Chromium (Debian's
# package): installed here with apt when missing, and said so.
browser:
	@command -v chromium >/dev/null || { \
		echo "make test: installing Debian's chromium for the browser tests (apt-get)"; \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		&& echo "make test: chromium installed" \
		|| echo "make test: could not install chromium: the browser tests will fail"; }

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The fast layer alone: no worker processes (about a minute).
unit: $(BIN)/.installed
	$(BIN)/python -m pytest -ra -m "not integration"

# Three test processes (pytest-xdist): most integration tests wait on worker processes.
test: $(BIN)/.installed browser lint
	$(BIN)/python -m pytest -ra -n 3 --dist loadfile --no-loadscope-reorder

bench: $(BIN)/.installed
	$(BIN)/featurefleet bench

clean:
	rm -rf featurefleet-demo test-artifacts .pytest_cache .mypy_cache .import_linter_cache
