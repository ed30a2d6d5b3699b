#!/usr/bin/env bash
# Sets up what the browser tests need, idempotently: Debian's `chromium` (only when /usr/bin/chromium is
# missing), Playwright's Python package in the project venv, and the newest ComfyUI frontend the tests
# also run in (scripts/fetch_frontend.sh: a cached, never installed copy served with --front-end-root).
# Playwright never downloads a browser here: the tests launch the system Chromium through `executable_path`.
# Exit status is non-zero when something could not be installed; the browser tests then skip with a reason.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${WEIGHTSMITH_VENV:-$ROOT/.venv}
CHROMIUM=${WEIGHTSMITH_CHROMIUM:-/usr/bin/chromium}
PLAYWRIGHT_VERSION=1.65.2

log() { printf '[setup-browser] %s\n' "$*" >&2; }

if [ ! -x "$CHROMIUM" ]; then
    if ! command -v apt-get >/dev/null; then
        log "no $CHROMIUM and no apt-get to install it"
        exit 1
    fi
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { log "installing chromium needs root (or sudo)"; exit 1; }
        SUDO=(sudo -n)
    fi
    log "installing Debian's chromium"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null
fi

if ! "$VENV/bin/python" -c 'import playwright.sync_api' 2>/dev/null; then
    log "installing playwright $PLAYWRIGHT_VERSION (Python package only, no browser download)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip --disable-pip-version-check -q \
        install "playwright==$PLAYWRIGHT_VERSION"
fi

rc=0
bash "$ROOT/scripts/fetch_frontend.sh" >/dev/null || rc=$?
if [ "$rc" -eq 3 ]; then
    log "the newest frontend could not be fetched (offline): its browser tests will skip, saying so"
elif [ "$rc" -ne 0 ]; then
    log "fetching the newest frontend failed (exit $rc)"
    exit "$rc"
fi

"$CHROMIUM" --version >&2
