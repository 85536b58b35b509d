#!/usr/bin/env bash
# One copy of torch for both test environments. torch 2.14.1's CUDA build with its nvidia-* wheels is
# ~5.5 GB; .venv (ComfyUI 0.3.75) and .venv029 (0.29.0) each installing it ran CI's disk full
# ("No space left on device" while building .venv029). So torch + torchvision live once in .torch/
# (pip --target) and each venv sees it through a .pth file, appended after the venv's own
# site-packages: a package the venv installs itself (another typing-extensions, say) still wins.
# pip inside the venv finds torch's dist-info on sys.path and treats the pin as satisfied.
# Usage: bash scripts/setup_torch.sh VENV   (idempotent; stamp file in .torch/)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$1
TORCH_DIR=${OCTET_TORCH_DIR:-$PWD/.torch}
STAMP="$TORCH_DIR/.octet-torch-2.14.1"
if [ ! -f "$STAMP" ]; then
  rm -rf "$TORCH_DIR" "$TORCH_DIR.tmp"
  # pip --target installs into a temporary folder first and then moves it into place. In the system temp
  # folder (a tmpfs or a small partition on some CI machines) that needs 5.5 GB there and, across file
  # systems, a copy: CI once failed here with "No space left on device" 32 s in. A temp folder beside the
  # target makes the move a rename on the same disk.
  mkdir -p "$TORCH_DIR.tmp"
  # Byte-compiled at install, here and in the venvs (not --no-compile, which saved 27 s of this install): this
  # machine's environment sets PYTHONDONTWRITEBYTECODE=1 (CI's, from the same image, likely too), so without the
  # byte code pip writes every process compiles what it imports, every time: `import torch` 4.4 s instead of 2.1.
  if ! TMPDIR="$TORCH_DIR.tmp" python3 -m pip --disable-pip-version-check -q install --no-cache-dir \
      --target "$TORCH_DIR" torch==2.14.1 torchvision==0.29.1; then
    echo "setup_torch: installing torch 2.14.1 + torchvision 0.29.1 into $TORCH_DIR failed (it needs ~6 GB free" \
         "on that disk; free space there now:)" >&2
    df -h "$(dirname "$TORCH_DIR")" >&2 || true
    echo "setup_torch: free some space or set OCTET_TORCH_DIR to a folder on a larger disk, then run the command again." >&2
    rm -rf "$TORCH_DIR" "$TORCH_DIR.tmp"
    exit 1
  fi
  rm -rf "$TORCH_DIR.tmp"
  touch "$STAMP"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
echo "$TORCH_DIR" > "$SITE/octet-torch.pth"
