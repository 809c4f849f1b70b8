# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-run

.PHONY: demo test install lint typecheck bench clean container-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sfxflow demo $(DEMO_DIR)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/sfxflow bench all

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# Runs the container's install steps in a clean virtual environment (no container engine needed).
container-check:
	bash scripts/container_check.sh
