#!/usr/bin/env bash
# Run the Dockerfile's install steps (its RUN lines that call "pip install", verbatim) in a
# clean virtual environment, then `sfxflow --help` and `sfxflow plan --list` from it. No
# container engine is needed; it needs PyPI (or a mirror via PIP_INDEX_URL).
#   usage: scripts/container_check.sh [PYTHON]      (default: python3.11)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-python3.11}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# the Python of the default base image (ARG BASE=python:X.Y.Z-...)
want="$(sed -n 's/^ARG BASE=python:\([0-9]*\.[0-9]*\).*/\1/p' "$ROOT/Dockerfile")"
have="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$want" != "$have" ]]; then
    echo "container_check: Dockerfile uses Python $want but $PYTHON is $have" >&2
    exit 2
fi

# the same layout as in the image: a source copy holding pyproject, README, constraints, src
export SFXFLOW_SRC="$WORK/sfxflow-src" CONSTRAINTS="$WORK/sfxflow-src/constraints.txt"
mkdir -p "$SFXFLOW_SRC"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/constraints.txt" "$SFXFLOW_SRC/"
cp -r "$ROOT/src" "$SFXFLOW_SRC/src"
find "$SFXFLOW_SRC/src" -name '__pycache__' -prune -exec rm -rf {} + -o -name '*.egg-info' -prune -exec rm -rf {} +

export VIRTUAL_ENV="$WORK/venv" PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m venv "$VIRTUAL_ENV"
export PATH="$VIRTUAL_ENV/bin:$PATH"

# RUN lines mentioning "pip install" (with continuation lines joined), in Dockerfile order
mapfile -t steps < <(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$ROOT/Dockerfile" \
                     | sed -n 's/^RUN \(.*pip install.*\)$/\1/p')
if [[ ${#steps[@]} -eq 0 ]]; then
    echo "container_check: no 'RUN ... pip install' lines found in the Dockerfile" >&2
    exit 2
fi
for step in "${steps[@]}"; do
    echo "+ $step"
    (cd "$WORK" && bash -euo pipefail -c "$step")
done

sfxflow --version
sfxflow --help > /dev/null
sfxflow plan --list > /dev/null
echo "container_check: OK (${#steps[@]} install steps, $(pip list --format=freeze | wc -l) packages)"
