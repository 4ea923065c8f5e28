# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) with everything it needs when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/featurefleet demo --output featurefleet-demo

test: $(BIN)/.installed
	@# The report test looks at report.html in a real headless Chromium (Debian's package).
	-@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: chromium not installed; the browser test will be skipped"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

bench: $(BIN)/.installed
	$(BIN)/featurefleet bench

clean:
	rm -rf featurefleet-demo test-artifacts .pytest_cache
