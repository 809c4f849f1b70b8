# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-run

.PHONY: extras demo test install lint typecheck bench clean container-check browser peers container slurm-up slurm-down sge-up sge-down

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sfxflow demo $(DEMO_DIR)

# The facility readers' optional extras (psana, extra-data, karabo-bridge); their tests skip,
# saying so, without them. psana's lcls-krtc needs Debian's libkrb5-dev to build.
extras: $(STAMP)
	command -v krb5-config >/dev/null 2>&1 || bash -c '. scripts/apt-install.sh && apt_install 600 libkrb5-dev'
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,lcls,euxfel]'

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

# Debian libraries of the CrystFEL 0.12 peers in ../shared/peers (compare_hkl, partialator tests).
peers:
	bash scripts/install-peer-libs.sh

# Headless Chromium for the report's browser test (Debian's package; .ci/run calls this too).
browser:
	bash scripts/install-chromium.sh

# Runs the container's install steps in a clean virtual environment (no container engine needed).
container-check:
	bash scripts/container_check.sh

# A one-node Slurm cluster on localhost for the Slurm tests (root; installs slurm-wlm and munge
# when absent; a second start does nothing). tests/pipeline/test_slurm.py skips without it.
slurm-up:
	bash scripts/slurm-up.sh

slurm-down:
	bash scripts/slurm-up.sh --down

# The same for Grid Engine (Debian's gridengine): qmaster, execd, queue all.q on this host.
sge-up:
	bash scripts/sge-up.sh

sge-down:
	bash scripts/sge-up.sh --down

# Builds the image with podman on a debootstrap Debian base and runs `sfxflow demo` inside it
# (root; exit 3 = this machine cannot build images, with the reason).
container:
	bash scripts/container-build.sh
