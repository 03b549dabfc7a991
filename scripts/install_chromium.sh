#!/usr/bin/env bash
# Debian's chromium for the inspector's browser tests (tests/server/test_inspector_browser.py,
# Playwright driving the system browser). Idempotent: nothing to do once it is installed.
# Without root or apt-get it says so, and those tests skip.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no chromium, and no root apt-get to install it: the browser tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq chromium >/dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
  || echo "install_chromium: apt-get could not install chromium: the browser tests will skip" >&2
