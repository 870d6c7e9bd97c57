#!/usr/bin/env bash
# Install everything the README's test command needs: this package with its dev and label extras,
# and Debian's Chromium, which the HTML report's browser test drives headless (through playwright).
# `pip install -e ".[dev,label]"` alone is enough when you do not need that test.
set -euo pipefail
cd "$(dirname "$0")"

pip install -e ".[dev,label]"

# Chromium: already there ($CHROMIUM, the system package or on PATH)? Then nothing to do.
if [ -x "${CHROMIUM:-/usr/bin/chromium}" ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
apt_install="export DEBIAN_FRONTEND=noninteractive; apt-get update && apt-get install -y --no-install-recommends chromium"
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    sh -c "$apt_install"
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n sh -c "$apt_install"
else
    echo "install.sh: Chromium is missing and cannot be installed here without a password or apt-get." >&2
    echo "  The HTML report's browser test (tests/test_browser.py) needs it. Install it with" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium" >&2
    echo "  (Debian/Ubuntu), or set CHROMIUM=/path/to/chromium, then rerun ./install.sh." >&2
    exit 1
fi
