# sfxflow container image: the same environment for cloud nodes (EC2/ECS: `dask worker` and
# `sfxflow process`) and HPC centres (Shifter, podman-hpc, Apptainer via `docker://` or
# apptainer.def). Build:   docker build -t sfxflow:0.1.0 .
#
# Pinned: the base image by full Python version (pin its digest too when you publish:
# `docker buildx imagetools inspect python:3.11.7-slim-bookworm`), every runtime dependency by
# constraints.txt (the versions the test suite ran with; scripts/lock_constraints.py).
# The install steps below (RUN lines with "pip install") are also run, verbatim, in a clean
# virtual environment by scripts/container_check.sh; tests/test_container_install.py checks
# they agree with pyproject.toml.
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/sfxflow \
    PATH=/opt/sfxflow/bin:$PATH \
    SFXFLOW_SRC=/opt/sfxflow-src \
    CONSTRAINTS=/opt/sfxflow-src/constraints.txt \
    MPLBACKEND=Agg \
    NUMBA_CACHE_DIR=/tmp/numba-cache

RUN python -m venv "$VIRTUAL_ENV"

# 1. dependencies (a layer of its own: rebuilt only when constraints.txt changes)
COPY constraints.txt "$CONSTRAINTS"
RUN pip install --require-virtualenv -r "$CONSTRAINTS"

# 2. sfxflow itself, against exactly those dependencies; pip check fails the build if they do
#    not satisfy pyproject.toml
COPY pyproject.toml README.md "$SFXFLOW_SRC"/
COPY src "$SFXFLOW_SRC"/src
RUN pip install --require-virtualenv --no-deps -c "$CONSTRAINTS" "$SFXFLOW_SRC" && pip check && sfxflow --help > /dev/null

# run as an unprivileged user; /data is a place to mount data and run directories
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin sfx && \
    mkdir -p /data && chown sfx:sfx /data
USER sfx
WORKDIR /data

ENTRYPOINT ["sfxflow"]
CMD ["--help"]
