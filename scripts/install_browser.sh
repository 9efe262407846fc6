#!/usr/bin/env bash
# Installs what the browser end-to-end test needs: Debian's chromium (apt) and
# Playwright's Python package (pip, into .venv). Playwright's own browser
# download is not used: the test drives /usr/bin/chromium through executable_path.
# Safe to run again: each part is skipped when already present.
set -euo pipefail
cd "$(dirname "$0")/.."
CHROMIUM=${SDLORA_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: $CHROMIUM is missing and apt-get is not available; install Chromium by hand" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "install_browser: installing chromium with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
VPY=${VPY:-.venv/bin/python}
[ -x "$VPY" ] || VPY=python3
if ! "$VPY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "install_browser: installing the playwright Python package" >&2
  "$VPY" -m pip install -q "playwright>=1.40"
fi
"$CHROMIUM" --version >&2
