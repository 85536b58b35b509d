# ComfyUI 0.29.0 for the GPU benches, offline (the device machines reach no registry): its source tarball and four
# wheels, unpacked under /tmp, `av` stubbed (no bench decodes video). What every "ComfyUI 0.29.0 (tarball +
# comfy-kitchen 0.2.24 + comfy-aimdo 0.4.10, `av` stubbed)" row of docs/BENCHMARKS.md ran on.
#
#   source bench/gpu_host029.sh [DIR]      # DIR (default .whl) holds comfyui-0.29.0.tgz and the wheels:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl comfy-kitchen==0.2.24 comfy-aimdo==0.4.10 \
#       torchsde trampoline                # on a machine with the registries; the tarball: ../shared/hosts
#   python3 bench/low_vram.py --dynamic-vram --model flux-dev --free-gib 8
#
# Exports COMFYUI_PATH (the benches and tests find the host there), PYTHONPATH (the wheels, the stub) and
# TRITON_CACHE_DIR. Sourced, so it does not exit the caller's shell: failures return 1 with a message.

_octet_gpu029() {
    local dir="${1:-.whl}" root=/tmp/octet_comfy029
    local tgz="$dir/comfyui-0.29.0.tgz"
    if [ ! -f "$tgz" ]; then
        echo "gpu_host029: $tgz not found: put ComfyUI 0.29.0's tarball (../shared/hosts) and the wheels in $dir" >&2
        return 1
    fi
    local wheels=("$dir"/comfy_kitchen-0.2.24-*.whl "$dir"/comfy_aimdo-*.whl "$dir"/torchsde-*.whl "$dir"/trampoline-*.whl)
    local w
    for w in "${wheels[@]}"; do
        if [ ! -f "$w" ]; then
            echo "gpu_host029: no wheel matches $w: download them as this script's header says" >&2
            return 1
        fi
    done
    mkdir -p "$root/src" "$root/site" "$root/stub/av/subtitles" "$root/stub/av/video" "$root/stub/av/container"
    tar xzf "$tgz" -C "$root/src" || return 1
    pip install -q --no-index --no-deps --target "$root/site" "${wheels[@]}" || return 1
    local f
    for f in av/__init__.py av/container/__init__.py av/subtitles/__init__.py av/video/__init__.py \
             av/subtitles/stream.py av/video/reformatter.py; do
        echo 'def __getattr__(name): return type(name, (), {})' > "$root/stub/$f"
    done
    COMFYUI_PATH=$(ls -d "$root"/src/*/ | head -1)
    PYTHONPATH="$root/site:$root/stub${PYTHONPATH:+:$PYTHONPATH}"
    TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$root/triton_cache}"
    export COMFYUI_PATH PYTHONPATH TRITON_CACHE_DIR
    echo "gpu_host029: COMFYUI_PATH=$COMFYUI_PATH"
}
_octet_gpu029 "$@"
