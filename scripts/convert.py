"""Quantize a safetensors diffusion-model file to an Octet (or portable) INT8 file, layer by layer.

    python -m scripts.convert model.safetensors model_int8.safetensors [--mode dynamic] [--kind portable]
        [--preset sdxl] [--rules "..."] [--overrides "..."] [--calibration calib.safetensors] [--kinds linear,conv]
        [--observer mse] [--percentile 99.99] [--smooth-alpha 0.5 | --no-smoothquant] [--no-timestep-groups]

Run it from the repository root (or give the path: python path/to/scripts/convert.py ...). Memory
stays near one layer (octet/convert.py); a model card <output>.md is written beside the output.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import octet_pack  # noqa: E402


def main(argv=None) -> int:
    pack = octet_pack.load()
    from comfyui_octet.octet import fileformat
    from comfyui_octet.octet.api import OctetError
    from comfyui_octet.octet.calibration import Calibration
    from comfyui_octet.octet.config import MODES, STATIC_RECIPE, StaticW8A8Config, config_for_mode
    from comfyui_octet.octet.convert import convert
    from comfyui_octet.octet.presets import PRESET_NAMES, build_policy

    ap = argparse.ArgumentParser(prog="python -m scripts.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("--mode", choices=MODES, default="dynamic")
    ap.add_argument("--kind", choices=fileformat.KINDS, default=fileformat.KIND_OCTET,
                    help="octet: everything INT8 (Octet's loader only); portable: what stock ComfyUI runs")
    ap.add_argument("--kinds", default="linear,conv", help="layer kinds to quantize: linear, conv or both")
    ap.add_argument("--preset", choices=list(PRESET_NAMES), default=None, help="mixed-precision policy preset")
    ap.add_argument("--conservative", action="store_true", help="the preset's conservative variant")
    ap.add_argument("--rules", default="", help="policy rules, as in the Mixed-Precision Policy node")
    ap.add_argument("--overrides", default="", help="exact-name overrides, as in the Mixed-Precision Policy node")
    ap.add_argument("--calibration", default=None, help="a calibration file (Save Calibration) for mode static")
    # Static settings: Quantize Model's widgets, with its defaults (a calibration holds statistics only).
    ap.add_argument("--observer", choices=list(StaticW8A8Config.OBSERVERS), default=STATIC_RECIPE.observer,
                    help="static: how an activation range is chosen from the calibration")
    ap.add_argument("--percentile", type=float, default=STATIC_RECIPE.percentile,
                    help="static, observer percentile: the share of values kept unclipped")
    ap.add_argument("--smooth-alpha", type=float, default=STATIC_RECIPE.smooth_alpha,
                    help="static: SmoothQuant alpha")
    ap.add_argument("--no-smoothquant", action="store_true", help="static: no SmoothQuant")
    ap.add_argument("--no-timestep-groups", action="store_true", help="static: one scale for all timesteps")
    ap.add_argument("--architecture", default=None,
                    help="ComfyUI model-config class to record (e.g. SDXL, Flux); default: detected when loading")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        kwargs = {"kinds": tuple(k.strip() for k in args.kinds.split(",") if k.strip())}
        calibration = Calibration.load(args.calibration) if args.calibration else None
        if args.mode == "static":
            if calibration is None:
                raise OctetError("--mode static needs --calibration (a file saved by Octet's Save Calibration).")
            kwargs.update(observer=args.observer, percentile=args.percentile,
                          timestep_groups=not args.no_timestep_groups,
                          smooth_alpha=None if args.no_smoothquant else args.smooth_alpha)
        config = config_for_mode(args.mode, **kwargs)
        policy = None
        if args.preset or args.rules or args.overrides:
            policy = build_policy(args.preset, conservative=args.conservative, rules=args.rules,
                                  overrides=args.overrides)
        bar = None
        if not args.quiet:
            from tqdm import tqdm
            bar = tqdm(unit="layer", desc="quantizing")

        def progress(done, total, name):
            if bar is not None:
                bar.total = total
                bar.set_postfix_str(name[-40:], refresh=False)
                bar.update(1)

        result = convert(args.source, args.output, config, policy=policy, calibration=calibration,
                         kind=args.kind, progress=progress, overwrite=args.overwrite,
                         architecture=args.architecture)
        if bar is not None:
            bar.close()
    except (OctetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} ({result.output_bytes / 2**20:.1f} MiB, {result.output_bytes / result.source_bytes:.3f}x "
          f"of the source) in {result.seconds:.1f} s; model card {result.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
