#!/usr/bin/env bash
# The second test host: ComfyUI 0.29.0 (July 2026), what users run today, beside the 0.3.75 that
# scripts/setup_env.sh installs. Idempotent (stamp files). Makes:
#   .hosts/comfy029/  the ComfyUI source, unpacked from $OCTET_HOSTS_DIR/comfyui-0.29.0.tgz
#                     (default ../shared/hosts, where CI has it, relative to the repository);
#   .venv029/         its own venv: 0.29 pins another frontend (1.47.10 vs 1.32.9), comfy-kitchen 0.2.24
#                     and comfy-aimdo, which must not leak into the 0.3.75 environment.
# The tests then run with COMFYUI_PATH=.hosts/comfy029 and .venv029's pytest (see the Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTS=${OCTET_HOSTS_DIR:-../shared/hosts}
TGZ="$HOSTS/comfyui-0.29.0.tgz"
DEST=.hosts/comfy029
VENV=${OCTET_VENV029:-.venv029}
STAMP="$VENV/.octet-setup-029-v2"

if [ ! -f "$DEST/.octet-unpacked" ]; then
  if [ ! -f "$TGZ" ]; then
    echo "setup_host029: $TGZ is missing. The ComfyUI 0.29.0 source snapshot lives in the shared folder beside" \
         "the repository (CI: ../shared/hosts/); set OCTET_HOSTS_DIR to the folder holding comfyui-0.29.0.tgz." >&2
    exit 2
  fi
  rm -rf "$DEST" .hosts/comfy029.tmp
  mkdir -p .hosts/comfy029.tmp
  tar -xzf "$TGZ" -C .hosts/comfy029.tmp
  mv .hosts/comfy029.tmp/comfy029 "$DEST"
  rmdir .hosts/comfy029.tmp
  touch "$DEST/.octet-unpacked"
fi

[ -f "$STAMP" ] && exit 0
python3 -m venv "$VENV"
# pip unpacks into TMPDIR; keep that on this disk, not a small system /tmp (see scripts/setup_torch.sh).
mkdir -p "$VENV/.piptmp"
export TMPDIR="$(cd "$VENV/.piptmp" && pwd)"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
PIP="$PIP --no-cache-dir"
# pip byte-compiles at install on purpose (not --no-compile): see scripts/setup_torch.sh.
bash scripts/setup_torch.sh "$VENV"   # the same torch + torchvision copy as .venv (disk)
# torch/torchvision are pinned above (the host lists them unpinned).
grep -v -E '^(torch|torchvision)([<>=~ ]|$)' "$DEST/requirements.txt" > "$VENV/requirements-029.txt"
$PIP install -r "$VENV/requirements-029.txt"
$PIP install -r requirements.txt pytest requests playwright
rm -rf "$VENV/.piptmp"
touch "$STAMP"
