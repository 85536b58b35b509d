"""Saved checkpoint size vs the source file, for Octet's recommended recipe (dynamic W8A8 + SmoothQuant).

    OCTET_TEST_THREADS=1 .venv/bin/python bench/checkpoint_size.py [--models mmdit dit unet]

Per reference model: calibrate as bench/quality.py does (8 images, seed 999), quantize every Linear/Conv2d
with DynamicW8A8Config(smooth_alpha=0.5) (0 % float parameters), save with Save Quantized's code
(Octet format) and print its size against the fp16 source file in models/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (loads the pack and the host)

from comfyui_octet.fixtures import reference_model as rm  # noqa: E402
from comfyui_octet.nodes import bridge, model_files  # noqa: E402
from comfyui_octet.octet import DynamicW8A8Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mmdit", "dit", "unet"], choices=list(rm.SPECS))
    args = ap.parse_args()
    settings = argparse.Namespace(cal_batch=8, steps=8, cfg=3.0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            fp = rm.load_reference(kind, "plain")
            cal = quality.Context(kind, "plain", fp, settings).calibration(4)
            q, _ = bridge.quantize_model(fp, DynamicW8A8Config(smooth_alpha=0.5), calibration=cal)
            out = os.path.join(tmp, f"{kind}.safetensors")
            model_files.save_model(q, out)
            size, src = os.path.getsize(out), os.path.getsize(rm.SPECS[kind].path)
            print(f"{kind}: checkpoint {size / 1e6:.2f} MB, fp16 source {src / 1e6:.2f} MB, ratio {size / src:.3f}")


if __name__ == "__main__":
    main()
