#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the browser test of the web chat (Wyrd), if
# they are missing. Needs root (or sudo); prints what to do otherwise.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "browser test: install Debian's chromium and chromium-driver packages (needs root)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || {
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null
}
