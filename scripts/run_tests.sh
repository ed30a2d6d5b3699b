#!/usr/bin/env bash
# The test command (README's `make test`, and CI's .ci/run): set up, lint, then the whole suite
# (core unit tests, in-process ComfyUI tests, end-to-end server tests, browser tests).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup_env.sh >/dev/null || { echo "setup failed"; exit 1; }
PY=.venv/bin/python
if [ -f scripts/setup_browser.sh ]; then
    bash scripts/setup_browser.sh || echo "[tests] browser setup failed; browser tests will be skipped"
fi
$PY -m ruff check . || { echo "[tests] ruff found problems"; exit 1; }
mkdir -p test-artifacts
$PY -m pytest -q -p no:cacheprovider --junitxml=test-artifacts/junit.xml "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[tests] pytest collected no tests"
    exit 1
fi
exit "$rc"
