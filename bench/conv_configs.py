"""INT8 conv tiles at SDXL's 3x3 shapes: which of the autotuner's configs (and which candidate tiles not in
it) is fastest per shape, next to cuDNN bf16 (NCHW, as ComfyUI runs it, and channels_last).

For each shape it clears the conv kernel's autotune cache, adds the candidate tiles to its config list, lets
Triton's autotuner time every config once (``configs_timings``) and prints the five fastest, the best of the
current list and the best candidate. GPU only; one process, card and versions printed with the numbers;
writes JSON (default out/, named for the card and date).

    python3 bench/conv_configs.py [--out out]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402
from overhead import card_header  # noqa: E402  (bench/overhead.py's card / versions / time line)

# (C_in, C_out, side): SDXL 1024² at batch 1, 3x3 / stride 1 / padding 1; concatenated inputs of the output blocks.
SHAPES = [(320, 320, 128), (640, 320, 128), (960, 320, 128), (640, 640, 64), (1280, 640, 64), (1280, 1280, 32),
          (2560, 1280, 32), (640, 1280, 32)]
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) not in conv_configs()
CANDIDATES = [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 64, 5, 8),
              (128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (128, 128, 128, 4, 4), (64, 256, 64, 4, 8),
              (128, 64, 128, 4, 4), (256, 64, 64, 4, 8), (64, 128, 128, 4, 4), (128, 128, 64, 6, 8)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "out"))
    args = parser.parse_args()
    octet_pack.load()
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_conv

    if not torch.cuda.is_available():
        print("bench/conv_configs.py times GPU kernels: it needs a CUDA device.")
        return 1
    card, stamp, header = card_header("INT8 conv kernel alone, Triton's autotune timing; ")
    print(header, flush=True)
    kernel = triton_conv._conv_kernel
    current = list(kernel.configs)
    kernel.configs = current + [triton_conv._cfg(*c) for c in CANDIDATES]
    names = {str(c) for c in current}
    rows = []
    for cin, cout, side in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1, cin, side, side, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.bfloat16, generator=g) / (cin * 9) ** 0.5
        qw, ws = torch_ref.quantize_weight(w.float().cpu())
        conv = triton_conv.ConvW8A8(qw.cuda(), ws.cuda(), None, 1, 1, 1, 1, None)
        kernel.cache.clear()
        y = conv(x)   # the autotuner times every config here
        timings = sorted(((t[0] if isinstance(t, (list, tuple)) else t) * 1e3, str(c))
                         for c, t in (getattr(kernel, "configs_timings", None) or {}).items())
        flops = 2 * side * side * cout * cin * 9
        ref = F.conv2d(x, w, None, 1, 1).float()
        xcl, wcl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
        row = {"c_in": cin, "c_out": cout, "side": side,
               "cudnn_nchw_us": do_bench(lambda: F.conv2d(x, w, None, 1, 1), warmup=10, rep=100) * 1e3,
               "cudnn_channels_last_us": do_bench(lambda: F.conv2d(xcl, wcl, None, 1, 1), warmup=10, rep=100) * 1e3,
               "best_current_us": min((t for t, c in timings if c in names), default=None),
               "best_candidate_us": min((t for t, c in timings if c not in names), default=None),
               "fastest": [{"us": t, "tops": flops / t / 1e6, "config": c} for t, c in timings[:5]],
               "rel_err_vs_bf16": float((y.float() - ref).norm() / ref.norm())}
        rows.append(row)
        print(f"{cin}->{cout} @{side}^2: cuDNN bf16 NCHW {row['cudnn_nchw_us']:.1f} us, channels_last "
              f"{row['cudnn_channels_last_us']:.1f}; INT8 conv kernel: best current config {row['best_current_us']:.1f} "
              f"us, best candidate {row['best_candidate_us']:.1f} us", flush=True)
        for f in row["fastest"]:
            print(f"   {f['us']:7.1f} us {f['tops']:6.0f} TOPS  {f['config']}")
    os.makedirs(args.out, exist_ok=True)
    slug = card.lower().replace("nvidia ", "").split()[0]
    path = os.path.join(args.out, f"conv_configs_{slug}_{stamp[:10]}.json")
    with open(path, "w") as fh:
        json.dump({"header": header, "rows": rows}, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
