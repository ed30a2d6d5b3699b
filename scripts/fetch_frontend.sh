#!/usr/bin/env bash
# Fetches the newest comfyui-frontend-package we test against (pinned below: the newest on PyPI when it
# was last checked) into a cache folder, for the browser tests to serve through ComfyUI's
# `--front-end-root`. The package is never installed: the wheel is downloaded with pip (no deps) and only
# its `comfyui_frontend_package/static` folder is unpacked. Users update the frontend package on its own,
# so the extension is tested in the pinned ComfyUI's own frontend AND in this one.
#
# Idempotent: a complete cache (marked by .complete) is reused. Offline, it exits 3 after saying so; the
# browser tests then skip the newest-frontend cases with that reason. To move to a newer frontend, bump
# NEWEST_FRONTEND_VERSION (check with `pip index versions comfyui-frontend-package`).
set -euo pipefail

NEWEST_FRONTEND_VERSION=${WEIGHTSMITH_NEWEST_FRONTEND:-1.58.1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${WEIGHTSMITH_VENV:-$ROOT/.venv}
CACHE=${WEIGHTSMITH_FRONTEND_CACHE:-$ROOT/.cache/frontends}
DEST="$CACHE/$NEWEST_FRONTEND_VERSION"

log() { printf '[fetch-frontend] %s\n' "$*" >&2; }

if [ -f "$DEST/.complete" ]; then
    echo "$DEST/static"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
log "downloading comfyui-frontend-package==$NEWEST_FRONTEND_VERSION (wheel only, not installed)"
if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q download --no-deps \
        "comfyui-frontend-package==$NEWEST_FRONTEND_VERSION" -d "$TMP" >"$TMP/pip.log" 2>&1; then
    log "offline or PyPI unreachable: cannot fetch frontend $NEWEST_FRONTEND_VERSION"
    tail -3 "$TMP/pip.log" >&2 || true
    exit 3
fi

rm -rf "$DEST.partial"
mkdir -p "$DEST.partial"
"$VENV/bin/python" - "$TMP"/comfyui_frontend_package-*.whl "$DEST.partial" <<'PY'
import sys
import zipfile
from pathlib import Path

wheel, dest = sys.argv[1], Path(sys.argv[2])
prefix = "comfyui_frontend_package/static/"
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not any(m == prefix + "index.html" for m in members):
        sys.exit(f"{wheel}: no {prefix}index.html in the wheel")
    for m in members:
        target = dest / "static" / m[len(prefix):]
        if ".." in Path(m).parts:
            sys.exit(f"{wheel}: unsafe member {m}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(m))
PY
touch "$DEST.partial/.complete"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
log "frontend $NEWEST_FRONTEND_VERSION in $DEST/static"
echo "$DEST/static"
