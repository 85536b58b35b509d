"""Quality of every INT8 method on both trained reference models and their outlier twins; writes docs/QUALITY.md.

    /work/venv/bin/python bench/quality.py [--samples 20] [--steps 8] [--models unet dit] [--methods ...]

For each reference model (ComfyUI SD15 UNet, ComfyUI Flux DiT; Fashion-MNIST, class-conditional) and each
variant (plain, twin = same float function with x20-60 activation outliers), the FP model samples one
image per seed (classes cycle) through the host's KSampler; every method then samples the same seeds and
is scored against those FP images: PSNR / SSIM (mean over images) and FID between the two sets in our
classifier's feature space (fixtures/feature_net.py), plus the diffusion model's size.

Methods are rows in a registry: add one with ``@method("label")`` and a function
``(ctx) -> MODEL | None`` (None = n/a, with ``ctx.note``); SmoothQuant, timestep groups, policies and QAT
go in as rows the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

octet_pack.load(comfy=True)
import torch  # noqa: E402

from comfyui_octet.nodes import bridge, evaluate  # noqa: E402

from comfyui_octet.fixtures import reference_model as rm, reference_twin
from comfyui_octet.octet import DynamicW8A8Config, StaticW8A8Config, WeightOnlyConfig  # noqa: E402


@dataclasses.dataclass
class Context:
    kind: str
    variant: str
    fp: object                 # the float MODEL (ModelPatcher)
    args: argparse.Namespace
    note: str = ""
    cal_classes: tuple = ()    # classes the calibration / sensitivity / QAT runs see; () = the default cycles
    _cal: dict = dataclasses.field(default_factory=dict)

    def labels(self, n: int, default):
        """Class labels for an n-sample tuning run: the ``cal_classes`` cycled, else ``default(i)``."""
        if self.cal_classes:
            return [self.cal_classes[i % len(self.cal_classes)] for i in range(n)]
        return [default(i) for i in range(n)]

    def calibration(self, groups: int):
        """A Calibration from a short run of the FP model on other seeds and classes (cached per groups).
        Statistics only: each method's StaticW8A8Config turns them into scales."""
        from comfyui_octet.nodes import calibrate_nodes
        key = groups
        if key not in self._cal:
            n = self.args.cal_batch
            pos = rm.batch_conditioning(self.kind, self.labels(n, lambda i: (3 * i + 1) % 10))
            neg = rm.class_conditioning(self.kind, "unconditional", batch=n)
            self._cal[key], _ = calibrate_nodes.calibrate(self.fp, pos, neg, rm.empty_latent(self.kind, n), 999,
                                                          self.args.steps, self.args.cfg, "euler", "normal", groups)
        return self._cal[key]


METHODS: dict[str, callable] = {}


def method(label: str):
    def register(fn):
        METHODS[label] = fn
        return fn
    return register


@method("FP (reference)")
def _fp(ctx):
    return ctx.fp


@method("weight-only W8A16")
def _weight_only(ctx):
    return bridge.quantize_model(ctx.fp, WeightOnlyConfig())[0]


@method("dynamic W8A8 per-token (= stock ComfyUI int8: per-row W, per-row dynamic A)")
def _dynamic(ctx):
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config())[0]


@method("dynamic W8A8 per-token on the Triton kernels (GPU path; on CPU under TRITON_INTERPRET=1)")
def _dynamic_triton(ctx):
    # The GPU's code path, where GELUs and LayerNorms are computed inside the next layer's quantization
    # (octet/deferred.py); OCTET_DEFERRED=0 in the environment runs the same kernels without that.
    from comfyui_octet.kernels.backends import triton_support
    if not triton_support.interpreting() and not torch.cuda.is_available():
        ctx.note = "needs a GPU or TRITON_INTERPRET=1"
        return None
    mode = "off" if os.environ.get("OCTET_DEFERRED", "1") == "0" else "on"
    ctx.note = f"deferred GELU/LayerNorm {mode}"
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config(backend="triton"))[0]


@method("naive static W8A8 per-tensor (minmax, 1 group)")
def _naive_static(ctx):
    cal = ctx.calibration(1)
    return bridge.quantize_model(ctx.fp, StaticW8A8Config(observer="minmax", timestep_groups=False), calibration=cal)[0]


@method("static W8A8 calibrated (mse, 4 timestep groups)")
def _static_groups(ctx):
    cal = ctx.calibration(4)
    return bridge.quantize_model(ctx.fp, StaticW8A8Config(observer="mse", timestep_groups=True), calibration=cal)[0]


@method("static W8A8 + SmoothQuant a=0.5 (mse, 4 groups)")
def _smoothquant(ctx):
    cal = ctx.calibration(4)
    return bridge.quantize_model(ctx.fp, StaticW8A8Config(observer="mse", timestep_groups=True, smooth_alpha=0.5),
                                 calibration=cal)[0]


@method("dynamic W8A8 per-token + SmoothQuant a=0.5")
def _dynamic_smooth(ctx):
    cal = ctx.calibration(4)
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config(smooth_alpha=0.5), calibration=cal)[0]


# --sweep: static W8A8 settings around the recipe's (SmoothQuant alpha, observer, timestep groups), next to
# dynamic per-token; written to docs/QUALITY_static_sweep.md. Answers whether a static row's gap to dynamic
# is a badly chosen setting or the per-tensor scale itself.
SWEEP: dict[str, callable] = {"FP (reference)": _fp, "dynamic W8A8 per-token": _dynamic}


def _static_sweep(alpha, observer, groups, percentile=99.99):
    def fn(ctx):
        cal = ctx.calibration(groups)
        config = StaticW8A8Config(observer=observer, percentile=percentile, timestep_groups=groups > 1,
                                  smooth_alpha=alpha)
        return bridge.quantize_model(ctx.fp, config, calibration=cal)[0]
    return fn


for _a in (None, 0.3, 0.5, 0.65, 0.8):
    SWEEP[f"static, SmoothQuant a={_a}, mse, 4 groups"] = _static_sweep(_a, "mse", 4)
SWEEP["static, SmoothQuant a=0.5, percentile 99.9, 4 groups"] = _static_sweep(0.5, "percentile", 4, 99.9)
SWEEP["static, SmoothQuant a=0.5, minmax, 4 groups"] = _static_sweep(0.5, "minmax", 4)
SWEEP["static, SmoothQuant a=0.5, mse, 1 group"] = _static_sweep(0.5, "mse", 1)
SWEEP["static, SmoothQuant a=0.5, mse, 8 groups"] = _static_sweep(0.5, "mse", 8)


def _sensitivity(ctx, mode: str, share: float, calibration=None):
    """A Sensitivity Policy measured on seeds and classes the scored images do not use."""
    from comfyui_octet.nodes.policy_nodes import SensitivityPolicy
    n = 2
    pos = rm.batch_conditioning(ctx.kind, ctx.labels(n, lambda i: (7 * i + 2) % 10))
    neg = rm.class_conditioning(ctx.kind, "unconditional", batch=n)
    out = SensitivityPolicy.execute(model=ctx.fp, positive=pos, negative=neg, latent=rm.empty_latent(ctx.kind, n),
                                    mode=mode, budget="max_float_share", value=share, base_preset="auto",
                                    seed=4321, steps=ctx.args.steps, cfg=ctx.args.cfg, scheduler="normal",
                                    block_depth=0, calibration=calibration)
    return out.result[0]


@method("dynamic W8A8 + policy preset (auto-detected)")
def _policy_preset(ctx):
    from comfyui_octet.nodes.policy_nodes import detect_preset
    from comfyui_octet.octet.presets import preset
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config(), policy=preset(detect_preset(ctx.fp)))[0]


@method("dynamic W8A8 + sensitivity policy (<= 10% params float)")
def _policy_sensitivity(ctx):
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config(), policy=_sensitivity(ctx, "dynamic", 0.10))[0]


@method("dynamic W8A8 + sensitivity policy (<= 25% params float)")
def _policy_sensitivity_25(ctx):
    return bridge.quantize_model(ctx.fp, DynamicW8A8Config(), policy=_sensitivity(ctx, "dynamic", 0.25))[0]


@method("Octet recipe: static W8A8 + SmoothQuant + 4 groups + sensitivity (<= 10% float)")
def _recipe(ctx):
    cal = ctx.calibration(4)
    config = StaticW8A8Config(observer="mse", timestep_groups=True, smooth_alpha=0.5)
    policy = _sensitivity(ctx, "static", 0.10, calibration=cal)
    return bridge.quantize_model(ctx.fp, config, policy=policy, calibration=cal)[0]


def with_states(*args):
    """The node's helper (nodes/attribution_nodes.py): one place for the fixed-states sampler."""
    from comfyui_octet.nodes.sampling import with_states as fn
    return fn(*args)


def _ends_policy(fp):
    """The preset's first/last-layer rules only: layers that matter little for size but much for error."""
    from comfyui_octet.nodes.policy_nodes import detect_preset
    from comfyui_octet.octet.policy import Policy
    from comfyui_octet.octet.presets import preset
    base = preset(detect_preset(fp))
    return Policy(name="first/last float", rules=[r for r in base.rules if "first layer" in r.why or "last layer" in r.why])


@method("weight-only W8A16, first/last layers float (preset's rules)")
def _weight_only_ends(ctx):
    return bridge.quantize_model(ctx.fp, WeightOnlyConfig(), policy=_ends_policy(ctx.fp))[0]


def _auto(ctx, base=None):
    """Per-layer static/dynamic by measured error (octet.attribution), on a trajectory of other seeds/classes."""
    from comfyui_octet.octet.attribution import attribute, auto_policy
    cal = ctx.calibration(4)
    config = StaticW8A8Config(observer="mse", timestep_groups=True, smooth_alpha=0.5)
    dm = bridge.diffusion_model(ctx.fp)
    n = 2
    pos = rm.batch_conditioning(ctx.kind, ctx.labels(n, lambda i: (7 * i + 2) % 10))
    neg = rm.class_conditioning(ctx.kind, "unconditional", batch=n)
    result = with_states(ctx.fp, pos, neg, rm.empty_latent(ctx.kind, n), 4321, ctx.args.steps, ctx.args.cfg, "normal",
                         lambda ev, sig: attribute(dm, ev, sig, config, cal))
    policy, chosen = auto_policy(result, 1.0, base=base)
    ctx.note = f"{sum(c == 'dynamic' for c in chosen.values())} of {len(chosen)} measured layers dynamic"
    return bridge.quantize_model(ctx.fp, config, policy=policy, calibration=cal)[0]


@method("Octet auto: static + SmoothQuant + 4 groups where within 1 dB of dynamic, else dynamic (per layer)")
def _auto_row(ctx):
    return _auto(ctx)


@method("Octet auto + preset (embeddings, adaLN, first/last layers float)")
def _auto_preset_row(ctx):
    from comfyui_octet.nodes.policy_nodes import detect_preset
    from comfyui_octet.octet.presets import preset
    return _auto(ctx, base=preset(detect_preset(ctx.fp)))


def _qat(ctx, quantized):
    """QAT Fine-tune node on teacher trajectories from other seeds and classes than the scored images."""
    from comfyui_octet.nodes.qat_nodes import QATFineTune
    n = 4
    labels = ctx.labels(n, lambda i: (7 * i + 5) % 10)
    pos = rm.batch_conditioning(ctx.kind, labels)
    neg = rm.class_conditioning(ctx.kind, "unconditional", batch=n)
    # The keep-or-return verdict samples classes the training never sees (at QAT's held-back seed).
    unseen = [c for c in range(10) if c not in labels]
    held = rm.batch_conditioning(ctx.kind, [unseen[i % len(unseen)] for i in range(n)])
    t0 = time.perf_counter()
    out = QATFineTune.execute(model=ctx.fp, positive=pos, negative=neg, latent_image=rm.empty_latent(ctx.kind, n),
                              seed=777, trajectories=2, steps=ctx.args.steps, cfg=ctx.args.cfg, sampler_name="euler",
                              scheduler="normal", train_steps=ctx.args.qat_steps, learning_rate=5e-4, lora_rank=4,
                              quantized_model=quantized, heldback_positive=held)
    ctx.note = f"QAT {ctx.args.qat_steps} steps, {time.perf_counter() - t0:.0f} s CPU"
    return out.result[0]


@method("QAT: dynamic W8A8 + distillation (LSQ scales, LoRA r4)")
def _qat_dynamic(ctx):
    return _qat(ctx, bridge.quantize_model(ctx.fp, DynamicW8A8Config())[0])


@method("QAT: naive static W8A8 per-tensor + distillation")
def _qat_static(ctx):
    cal = ctx.calibration(1)
    ptq = bridge.quantize_model(ctx.fp, StaticW8A8Config(observer="minmax", timestep_groups=False), calibration=cal)[0]
    return _qat(ctx, ptq)


class Scheduled:
    """A method whose sampling is not a plain KSampler run: the INT8 Sampler's precision schedule."""

    def __init__(self, model, float_model, float_first, float_last):
        self.model, self.float_model, self.first, self.last = model, float_model, float_first, float_last

    def sample_run(self, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler):
        from comfyui_octet.nodes import sampling
        t0 = time.perf_counter()
        out, _ = sampling.sample_schedule(self.model, self.float_model, positive, negative, latent, seed, steps, cfg,
                                          sampler_name, scheduler, float_first_steps=self.first,
                                          float_last_steps=self.last)
        seconds = time.perf_counter() - t0
        return evaluate.SampleRun(out["samples"], seconds, steps, None, int(self.model.model_size()))


@method("INT8 Sampler: dynamic W8A8, first 2 steps in float")
def _int8_sampler(ctx):
    return Scheduled(bridge.quantize_model(ctx.fp, DynamicW8A8Config())[0], ctx.fp, 2, 0)


def _bf16(fp):
    """A bf16 copy of the float MODEL (its own module: the FP reference stays fp32), run in bf16 as ComfyUI runs
    a bf16 checkpoint on a GPU."""
    import copy
    import comfy.model_patcher
    model = copy.deepcopy(fp.model)
    model.diffusion_model.to(torch.bfloat16)
    model.diffusion_model.dtype = torch.bfloat16
    model.manual_cast_dtype = None
    return comfy.model_patcher.ModelPatcher(model, load_device=fp.load_device, offload_device=fp.offload_device)


@method("bf16 model, host attention")
def _bf16_host(ctx):
    return _bf16(ctx.fp)


@method("bf16 model + INT8 attention (q·kᵀ int8, k smoothed; under TRITON_INTERPRET=1 on CPU)")
def _bf16_int8_attention(ctx):
    from comfyui_octet.octet import attention
    from comfyui_octet.kernels.backends import triton_support
    if triton_support.unavailable_reason() is not None:
        ctx.note = f"n/a: {triton_support.unavailable_reason()}"
        return None
    return attention.install(_bf16(ctx.fp))[0]


@method("bitsandbytes LLM.int8 (dynamic, threshold 6)")
def _bnb(ctx):
    try:
        q = bridge.quantize_model(ctx.fp, DynamicW8A8Config(kinds=("linear",), backend="bitsandbytes"))[0]
        evaluate.sample_run(q, *sampler_args(ctx.kind, 2, ctx.args))  # does it run here at all?
        return q
    except Exception as exc:  # reported in the table, not swallowed
        ctx.note = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        return None


# --generalisation (issue 15): tune (calibrate, sensitivity, QAT) on SUBSET_CLASSES only, at seeds the scored
# images never use (calibration 999, sensitivity 4321, QAT 777; scored: seed --seed, one noise per batch index),
# then score every class; the same rows calibrated on all ten classes are the comparison. Written to
# docs/QUALITY_generalisation.md.
SUBSET_CLASSES = (2, 5, 9)   # pullover, sandal, ankle-boot: one top, one shoe, one boot; 3 of the 10 classes
GEN_METHODS = {
    "weight-only W8A16": _weight_only,
    "dynamic W8A8 per-token": _dynamic,
    "dynamic W8A8 per-token + SmoothQuant a=0.5": _dynamic_smooth,
    "static W8A8 calibrated (mse, 4 groups)": _static_groups,
    "static W8A8 + SmoothQuant a=0.5 (mse, 4 groups)": _smoothquant,
    "Octet recipe (static + SQ + 4 groups + sensitivity <= 10% float)": _recipe,
    "Octet auto (per-layer static/dynamic by measured error)": _auto_row,
}
CALIBRATION_FREE = ("weight-only", "dynamic")


def generalisation(args):
    rows, t_start = [], time.time()
    labels = torch.tensor([i % 10 for i in range(args.samples)])
    in_subset = torch.tensor([int(c) in SUBSET_CLASSES for c in labels])
    print(f"{'model':<6} {'variant':<6} {'method':<66} {'tuned on':<10} {'all':>6} {'tuned':>6} {'other':>6}")
    for kind in args.models:
        for variant in rm.VARIANTS:
            fp = rm.load_reference(kind, variant)
            sargs = sampler_args(kind, args.samples, args)
            ref_img, _ = evaluate.to_images(fp, evaluate.sample_run(fp, *sargs).latents)
            for label, fn in GEN_METHODS.items():
                if args.methods and not any(m in label for m in args.methods):
                    continue
                needs_calibration = "SmoothQuant" in label or not label.startswith(CALIBRATION_FREE)
                tunings = [("-", ())] if not needs_calibration else \
                    [("3 classes", SUBSET_CLASSES), ("10 classes", tuple(range(10)))]
                for tuned, classes in tunings:
                    ctx = Context(kind, variant, fp, args, cal_classes=classes)
                    t0 = time.time()
                    q = fn(ctx)
                    img, _ = evaluate.to_images(fp, evaluate.sample_run(q, *sargs).latents)
                    p = evaluate.metrics.psnr(ref_img, img)
                    row = dict(model=kind, variant=variant, method=label, tuned=tuned,
                               all=evaluate.metrics.finite_mean(p), sub=evaluate.metrics.finite_mean(p[in_subset]),
                               other=evaluate.metrics.finite_mean(p[~in_subset]), seconds=time.time() - t0,
                               per_class=[evaluate.metrics.finite_mean(p[labels == c]) for c in range(10)])
                    rows.append(row)
                    print(f"{kind:<6} {variant:<6} {label[:66]:<66} {tuned:<10} {row['all']:>6.2f} {row['sub']:>6.2f} "
                          f"{row['other']:>6.2f}", flush=True)
    write_generalisation(args, rows, time.time() - t_start)
    print(f"\nwrote {args.out} in {time.time() - t_start:.0f} s")


def write_generalisation(args, rows, seconds):
    names = ", ".join(f"{c} {rm.CLASSES[c]}" for c in SUBSET_CLASSES)
    lines = ["# Static W8A8 generalisation: calibrated on 3 classes, scored on all 10", "",
             f"Generated by `bench/quality.py --generalisation` ({datetime.date.today().isoformat()}, CPU, torch "
             f"{torch.__version__}, {seconds:.0f} s). Metric: image PSNR vs the FP model's image at the same seed "
             f"(mean over images, [0,1] pixels). Scored: {args.samples} images, classes 0-9 cycled, KSampler seed "
             f"{args.seed} (one noise per batch index), euler {args.steps} steps, cfg {args.cfg}, normal scheduler.",
             "", f"Tuning runs see only their classes and other seeds: calibration seed 999 ({args.cal_batch} images), "
             "sensitivity seed 4321 (2 images), QAT seed 777. *3 classes* = classes "
             f"{names}; *10 classes* = all. Columns: PSNR over all scored images, over the images of the tuning "
             "classes, over the others (never seen by the 3-class tuning).", "",
             "| model | variant | method | tuned on | PSNR all | PSNR tuned classes | PSNR other classes | "
             "3-class minus 10-class (all) |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gap = ""
        if r["tuned"] == "3 classes":
            other = next((o for o in rows if o["tuned"] == "10 classes" and
                          (o["model"], o["variant"], o["method"]) == (r["model"], r["variant"], r["method"])), None)
            gap = f"{r['all'] - other['all']:+.2f}" if other else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['method']} | {r['tuned']} | {r['all']:.2f} | "
                     f"{r['sub']:.2f} | {r['other']:.2f} | {gap} |")
    lines += ["", "Per class (PSNR dB, classes 0-9):", ""]
    for r in rows:
        lines.append(f"- {r['model']} {r['variant']} {r['method']} [{r['tuned']}]: " +
                     " ".join(f"{v:.1f}" for v in r["per_class"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def sampler_args(kind, n, args):
    labels = [i % 10 for i in range(n)]
    pos = rm.batch_conditioning(kind, labels)
    neg = rm.class_conditioning(kind, "unconditional", batch=n)
    return pos, neg, rm.empty_latent(kind, n), args.seed, args.steps, args.cfg, "euler", "normal"


def outlier_summary(kind, plain, twin):
    s = rm.spec(kind)
    x = torch.randn(4, s.latent_channels, s.latent_size, s.latent_size, generator=torch.Generator().manual_seed(0))
    c = rm.batch_conditioning(kind, [0, 3, 6, 9])
    kw = {"context": c[0][0], **({"y": c[0][1]["pooled_output"]} if kind in rm.FLOW_KINDS else {})}
    t = (torch.tensor([800.0, 500.0, 200.0, 50.0]) if kind == "unet"  # model timesteps (SD3 scales sigma by 1000)
         else rm.model_sampling(kind).timestep(torch.tensor([0.8, 0.5, 0.2, 0.05])))
    outs = {}
    for p in (plain, twin):  # a loaded quantized clone's layers may still be swapped into the shared model
        bridge.release_clones(p)

    def run(p, key):
        with torch.no_grad():
            outs[key] = p.model.diffusion_model(x, t, **kw)
    rp = reference_twin.channel_outlier_ratios(plain.model.diffusion_model, lambda: run(plain, "p"))
    rt = reference_twin.channel_outlier_ratios(twin.model.diffusion_model, lambda: run(twin, "t"))
    sites = twin.model_options["octet_reference"]["twin"]
    summary = reference_twin.summarize_ratios(rp, rt, [c for site in sites for c in site["consumers"]])
    summary["sites"] = len(sites)
    summary["max_abs_output_diff"] = float((outs["p"] - outs["t"]).abs().max())
    summary["per_layer"] = sorted(((k, rp[k], rt[k]) for k in rt), key=lambda r: -r[2])[:6]
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20, help="images (seeds) per row; FID needs >= 16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cal-batch", type=int, default=8)
    ap.add_argument("--models", nargs="*", default=list(rm.SPECS), choices=list(rm.SPECS))
    ap.add_argument("--methods", nargs="*", default=None, help="substrings of method labels to run (default all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "QUALITY.md"))
    ap.add_argument("--qat-steps", type=int, default=120, help="optimizer steps of the QAT rows")
    ap.add_argument("--pareto", default=None, help="also draw size vs PSNR (Pareto front) to this PNG")
    ap.add_argument("--sweep", action="store_true",
                    help="static settings sweep instead of the method table (default out docs/QUALITY_static_sweep.md)")
    ap.add_argument("--generalisation", action="store_true",
                    help="tune on 3 classes, score all 10 (default out docs/QUALITY_generalisation.md)")
    args = ap.parse_args()
    if args.sweep and args.out == ap.get_default("out"):
        args.out = os.path.join(ROOT, "docs", "QUALITY_static_sweep.md")
    torch.manual_seed(0)
    if os.environ.get("OCTET_TEST_THREADS"):  # on a shared CPU, one thread avoids OpenMP spinning
        torch.set_num_threads(int(os.environ["OCTET_TEST_THREADS"]))
    if args.generalisation:
        if args.out == ap.get_default("out"):
            args.out = os.path.join(ROOT, "docs", "QUALITY_generalisation.md")
        return generalisation(args)
    methods = {k: v for k, v in (SWEEP if args.sweep else METHODS).items()
               if args.methods is None or k.startswith("FP") or any(m in k for m in args.methods)}
    clf, clf_meta = evaluate.classifier()
    rows, outliers, t_start = [], {}, time.time()
    header = f"{'model':<5} {'variant':<6} {'method':<78} {'PSNR dB':>8} {'SSIM':>7} {'FID':>8} {'size MiB':>9} {'s':>6}"
    print(header)
    for kind in args.models:
        plains = {}
        for variant in rm.VARIANTS:
            fp = rm.load_reference(kind, variant)
            plains[variant] = fp
            sargs = sampler_args(kind, args.samples, args)
            ref = evaluate.sample_run(fp, *sargs)
            ref_img, _ = evaluate.to_images(fp, ref.latents)
            with torch.no_grad():  # how well the FP samples are recognised: the model is a real generator
                class_acc = float((clf(ref_img).argmax(1) == torch.tensor([i % 10 for i in range(args.samples)]))
                                  .float().mean())
            for label, fn in methods.items():
                ctx = Context(kind, variant, fp, args)
                t0 = time.time()
                q = fn(ctx)
                if q is None:
                    row = dict(model=kind, variant=variant, method=label, psnr=None, ssim=None, fid=None,
                               size=None, seconds=time.time() - t0, note=ctx.note)
                else:
                    run = (ref if q is fp else q.sample_run(*sargs) if isinstance(q, Scheduled)
                           else evaluate.sample_run(q, *sargs))
                    img, _ = evaluate.to_images(fp, run.latents)
                    cmp = evaluate.compare(ref_img, img, fid_features=True)
                    row = dict(model=kind, variant=variant, method=label, psnr=cmp["psnr"], ssim=cmp["ssim"],
                               fid=cmp["fid"], size=run.size_bytes / 2**20, seconds=time.time() - t0,
                               note=f"FP class accuracy {class_acc:.2f}" if q is fp else ctx.note)
                rows.append(row)
                print(fmt_row(row), flush=True)
        outliers[kind] = outlier_summary(kind, plains["plain"], plains["twin"])
    write_markdown(args, rows, outliers, clf_meta, time.time() - t_start)
    if args.pareto:
        draw_pareto(rows, args.pareto)
    print(f"\nwrote {args.out} in {time.time() - t_start:.0f} s")


def draw_pareto(rows, path):
    """Size vs PSNR per model/variant, the Pareto front (smaller and closer to FP) joined by a line."""
    from comfyui_octet.nodes.plotting import pareto_chart
    panels = {}
    for model, variant in sorted({(r["model"], r["variant"]) for r in rows}):
        panels[f"{model} / {variant}"] = [
            {"x": r["size"], "y": r["psnr"], "label": r["method"].split(" (= stock")[0]
             .replace("dynamic W8A8 + ", "").replace("params float", "float")}
            for r in rows if (r["model"], r["variant"]) == (model, variant) and r["psnr"] is not None
            and r["size"] is not None and r["psnr"] != float("inf")]
    pareto_chart(panels, path, "size (MiB)", "PSNR vs FP (dB)")


def _f(v, spec):
    return "n/a" if v is None else ("inf" if v == float("inf") else format(v, spec))


def fmt_row(r):
    return (f"{r['model']:<5} {r['variant']:<6} {r['method'][:78]:<78} {_f(r['psnr'], '.2f'):>8} {_f(r['ssim'], '.4f'):>7} "
            f"{_f(r['fid'], '.3f'):>8} {_f(r['size'], '.2f'):>9} {r['seconds']:>6.0f}" + (f"  {r['note']}" if r['note'] else ""))


def write_markdown(args, rows, outliers, clf_meta, seconds):
    clf_hash = hashlib.sha256(open(evaluate.CLASSIFIER_PATH, "rb").read()).hexdigest()[:12]
    title = "Static W8A8 settings sweep" if args.sweep else "Quality of INT8 methods"
    lines = [f"# {title} on the reference models", "",
             f"Generated by `bench/quality.py` ({datetime.date.today().isoformat()}, CPU, torch {torch.__version__}, "
             f"{seconds:.0f} s): {args.samples} images per row (classes cycle 0-9), {args.steps} euler steps, "
             f"cfg {args.cfg}, seed {args.seed}, through ComfyUI's KSampler. Every row is scored against the FP "
             "model's images at the same seeds: PSNR / SSIM (mean over images, [0,1] pixels) and FID between the "
             f"two sets in the features of Octet's Fashion-MNIST classifier (sha256 {clf_hash}, test accuracy "
             f"{clf_meta.get('test_accuracy', float('nan')):.4f}). FID here is only comparable within this table; "
             f"with {args.samples} samples it is noisy. Size is the diffusion model's bytes (float layers fp32 here).",
             "", "Models: `unet` = ComfyUI SD15 UNet class (eps), `dit` = ComfyUI Flux class (flow matching); "
             "`twin` = same float function with activation outliers (x20-60 channels at qkv/fc1 inputs).", "",
             "| model | variant | method | PSNR dB | SSIM | FID | size MiB | note |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['method']} | {_f(r['psnr'], '.2f')} | {_f(r['ssim'], '.4f')} "
                     f"| {_f(r['fid'], '.3f')} | {_f(r['size'], '.2f')} | {r['note']} |")
    if args.sweep:
        lines += ["", "Best static setting per model (PSNR), against dynamic per-token:", ""]
        for kind in dict.fromkeys(r["model"] for r in rows):
            for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == kind):
                mine = [r for r in rows if r["model"] == kind and r["variant"] == variant and r["psnr"] is not None]
                dyn = next((r for r in mine if r["method"].startswith("dynamic")), None)
                static = [r for r in mine if r["method"].startswith("static")]
                if dyn is None or not static:
                    continue
                best = max(static, key=lambda r: r["psnr"])
                spread = max(r["psnr"] for r in static) - min(r["psnr"] for r in static if "a=None" not in r["method"])
                lines.append(f"- {kind} {variant}: best `{best['method']}` {best['psnr']:.2f} dB, dynamic "
                             f"{dyn['psnr']:.2f} dB ({best['psnr'] - dyn['psnr']:+.2f} dB); the smoothed settings "
                             f"span {spread:.2f} dB")
    lines += ["", "Notes:",
              "- *dynamic W8A8 per-token* is also the stock ComfyUI `int8_tensorwise` recipe (per-row weight scales, "
              "per-row dynamic activation scales): one row for both.",
              "- *naive static per-tensor*: one activation scale per layer from a short calibration run "
              f"({args.cal_batch} images, other seeds/classes), minmax, no timestep groups "
              "(octet.StaticW8A8Config + calibrate_nodes.calibrate).",
              "- bitsandbytes rows run bitsandbytes' own int8 matmul (LLM.int8 with outlier decomposition) on "
              "Linear layers only (it has no conv): the UNet's convs stay float, hence its larger size.",
              "- Sensitivity policies are measured on other seeds and classes than the scored images; the INT8 "
              "Sampler row runs the first 2 of the steps with the float model (against error accumulation).",
              "- `--methods` picks a subset of rows (substrings of the labels).",
              "", "## Outlier twins: activation channel ratios", "",
              "Per Linear/Conv2d input: max over channels / median over channels of per-channel absmax, one forward "
              "of 4 samples. The twin's float output equals the plain model's (max |diff| below).", "",
              "| model | rescaled sites | median ratio, all layers (plain -> twin) | median ratio at rescaled consumers "
              "(plain -> twin) | max ratio twin | max abs output diff |", "|---|---:|---|---|---:|---:|"]
    for kind, s in outliers.items():
        lines.append(f"| {kind} | {s['sites']} | {s['median_ratio_all_plain']:.1f} -> {s['median_ratio_all_twin']:.1f} | "
                     f"{s['median_ratio_consumers_plain']:.1f} -> {s['median_ratio_consumers_twin']:.1f} | "
                     f"{s['max_ratio_twin']:.1f} | {s['max_abs_output_diff']:.2e} |")
    lines += ["", "Largest twin ratios per model (layer: plain -> twin):", ""]
    for kind, s in outliers.items():
        lines.append(f"- {kind}: " + "; ".join(f"`{k}` {a:.1f} -> {b:.1f}" for k, a, b in s["per_layer"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
