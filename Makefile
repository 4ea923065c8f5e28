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
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

clean:
	rm -rf featurefleet-demo test-artifacts .pytest_cache
