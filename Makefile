# Two commands on a fresh machine: `make demo` (the built-in CPU demo) and `make test` (the suite CI runs).
# Both create the virtual environment first when it is missing.
PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-quick test lint

ENV_STAMP := $(VENV)/.installed

# Re-run when the dependencies change or an earlier install stopped half-way. requirements.txt installs the
# project itself, editable (`pip install -e .[test]`), so its packages and commands work from any folder.
$(ENV_STAMP): pyproject.toml requirements.txt requirements-files.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -r requirements-files.txt
	touch $@

setup: $(ENV_STAMP)

demo: $(ENV_STAMP)
	$(VENV)/bin/python demo.py $(DEMO_ARGS)

demo-quick: $(ENV_STAMP)
	$(VENV)/bin/python demo.py --quick --out runs/demo-quick $(DEMO_ARGS)

test: $(ENV_STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(ENV_STAMP)
	$(VENV)/bin/ruff check .
