#!/usr/bin/env bash
# What tests/test_dashboard_browser.py needs, installed without prompts and quietly:
#   * Debian's `chromium` package (the browser; skipped when /usr/bin/chromium exists);
#   * the `playwright` Python package (it bundles its driver; listed in the test extras, installed here
#     only if missing). Playwright's own browser download is never used: the test launches /usr/bin/chromium.
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  "$PY" -m pip install -q playwright
fi
echo "browser ready: $(/usr/bin/chromium --version 2>/dev/null || echo chromium), playwright $("$PY" -c 'from importlib.metadata import version; print(version("playwright"))')"
