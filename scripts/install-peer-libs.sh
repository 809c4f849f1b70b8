#!/usr/bin/env bash
# Installs the Debian libraries that CrystFEL 0.12's programs in ../shared/peers need at run time
# (../shared/peers/README.md), when they are absent. Never fails the caller: without them the
# tests that run compare_hkl, check_hkl or partialator skip and say why.
set -uo pipefail
peers="$(dirname "${BASH_SOURCE[0]}")/../../shared/peers/crystfel-0.12/bin"
if [ ! -x "$peers/compare_hkl" ]; then
    echo "install-peer-libs: no CrystFEL peers at $peers; their tests will be skipped"
    exit 0
fi
if "$peers/compare_hkl" --version >/dev/null 2>&1; then
    echo "install-peer-libs: the CrystFEL peers already run"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
    echo "install-peer-libs: no apt-get or not root; the CrystFEL peer tests will be skipped"
    exit 0
fi
# shellcheck source=scripts/apt-install.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh"
if apt_install 600 libgsl27 libgslcblas0 libhdf5-103-1 libhdf5-hl-100 libfftw3-double3 libzmq5 \
        libcjson1 libmsgpackc2 && "$peers/compare_hkl" --version >/dev/null 2>&1; then
    echo "install-peer-libs: the CrystFEL peers run"
else
    echo "install-peer-libs: the libraries could not be installed; the peer tests will be skipped"
fi
exit 0
