# sfxflow container image: the same environment for cloud nodes (EC2/ECS: `dask worker` and
# `sfxflow process`) and HPC centres (Shifter, podman-hpc, Apptainer via `docker://` or
# apptainer.def). Build:   docker build -t sfxflow:0.1.0 .
#
# The base is a build argument: by default the pinned Python image (pin its digest too when you
# publish: `docker buildx imagetools inspect python:3.11.7-slim-bookworm`); any Debian bookworm
# image without Python works too, Python then coming from Debian's packages (3.11, as tested):
#     podman build --isolation=chroot --build-arg BASE=localhost/debian-bookworm:minbase .
# is what scripts/container-build.sh does in CI, with a base made by debootstrap. Package
# indexes and a site's CA come from the build's environment (--build-arg PIP_INDEX_URL=...,
# PIP_CERT with the file mounted by `podman build -v`), never from this file.
#
# Every runtime dependency is pinned by constraints.txt (the versions the test suite ran with;
# scripts/lock_constraints.py). The install steps below (RUN lines with "pip install") are also
# run, verbatim, in a clean virtual environment by scripts/container_check.sh;
# tests/test_container_install.py checks they agree with pyproject.toml.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE}

# a base without Python: Debian's python3 (and venv); the pinned Python image skips this
RUN if ! command -v python3 > /dev/null; then \
        apt-get update && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi

# where pip finds packages and which CA it trusts, from the builder's environment (none is set
# by default; build arguments do not persist in the image)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/sfxflow \
    PATH=/opt/sfxflow/bin:$PATH \
    SFXFLOW_SRC=/opt/sfxflow-src \
    CONSTRAINTS=/opt/sfxflow-src/constraints.txt \
    MPLBACKEND=Agg \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    SFXFLOW_NUMBA_CACHE_SEED=/opt/sfxflow/numba-cache

RUN python3 -m venv "$VIRTUAL_ENV"

# 1. dependencies (a layer of its own: rebuilt only when constraints.txt changes)
COPY constraints.txt "$CONSTRAINTS"
RUN pip install --require-virtualenv -r "$CONSTRAINTS"

# 2. sfxflow itself, against exactly those dependencies; pip check fails the build if they do
#    not satisfy pyproject.toml
COPY pyproject.toml README.md "$SFXFLOW_SRC"/
COPY src "$SFXFLOW_SRC"/src
RUN pip install --require-virtualenv --no-deps -c "$CONSTRAINTS" "$SFXFLOW_SRC" && pip check && sfxflow --help > /dev/null

# 3. numba's compiled kernels, built once here (a small demo run in this process, ~70 CPU-s):
#    the image is read-only where HPC centres run it, so sfxflow copies them into the writable
#    NUMBA_CACHE_DIR at a node's first start (sfxflow/kernel_cache.py) instead of every worker
#    compiling them again. Entries are per CPU: a node whose CPU differs from the build host's
#    compiles as before.
RUN NUMBA_CACHE_DIR="$SFXFLOW_NUMBA_CACHE_SEED" sfxflow demo /tmp/warm-up --frames 24 \
        --hit-fraction 1 --scheduler synchronous > /dev/null && rm -rf /tmp/warm-up

# run as an unprivileged user; /data is a place to mount data and run directories
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin sfx && \
    mkdir -p /data && chown sfx:sfx /data
USER sfx
WORKDIR /data

ENTRYPOINT ["sfxflow"]
CMD ["--help"]
