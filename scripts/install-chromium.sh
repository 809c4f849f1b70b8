#!/usr/bin/env bash
# Installs headless Chromium (Debian's package) for the report's browser test, when it is absent.
# Never fails the caller: without a browser the test skips and says why.
set -uo pipefail
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install-chromium: $(command -v "$name") is already installed"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get here; the browser test will be skipped"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: not root; run 'sudo apt-get install chromium' for the browser test"
    exit 0
fi
echo "install-chromium: apt-get install chromium ..."
# shellcheck source=scripts/apt-install.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh"
if apt_install 900 chromium fonts-dejavu-core; then
    echo "install-chromium: installed $(chromium --version 2>/dev/null)"
else
    echo "install-chromium: apt-get failed; the browser test will be skipped"
fi
exit 0
