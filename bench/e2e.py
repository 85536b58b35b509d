"""End-to-end step latency and VRAM of full-size models in ComfyUI: bf16 vs the host's fp8 vs Octet.

Builds ComfyUI's real model classes at full size from their supported-model configs (random
weights: speed does not depend on the values), then per model and variant measures the median
latency of one ``BaseModel.apply_model`` step, peak VRAM of that step, weight bytes, and the time
Octet takes to quantize. Every ratio is against the bf16 baseline measured in the same process.

    python bench/e2e.py                      # GPU: all models, eager
    python bench/e2e.py --modes eager graph compile --deadline 540   # issue 13's table: one call, three modes
    python bench/e2e.py --models flux-dev --compile
    python bench/e2e.py --graph --models sdxl --variants bf16 octet_dynamic   # + CUDA Graph Step rows
    python bench/e2e.py --tiny               # CPU smoke test of the same code with shrunken configs
    python bench/e2e.py --models sdxl sd1.5 --variants bf16 bf16_octet_fused octet_dynamic --modes eager graph
                                             # INT8's share vs the fused float ops' (see VARIANTS)

Modes, per model and variant, on one built (and quantized) model: ``eager`` (stock ComfyUI),
``graph`` (through the CUDA Graph Step node), ``compile`` (torch.compile of the diffusion model, the
host's TorchCompileModel; ``--compile-variants`` picks which variants, compile time is minutes),
``compile_graph`` (that compiled model's step through CUDA Graph Step, as TorchCompileModel followed by
Quantize Model's ``cuda_graph`` or the CUDA Graph Step node runs it: Inductor's fusions without the host in
the step; implies ``compile``).
``--deadline`` stops starting new work after that many seconds and still writes the rows it has
(the JSON is rewritten after every variant, so a killed run keeps what it measured).

``--rounds N`` runs each model's variant list N times in alternating order (forward, reversed, ...)
and reports each row's median over the rounds, with every round's value in ``step_ms_rounds``. Why:
on the H200 hosts the eager step of a process's first quantized variant often ran slower than the
same code later in the process (SDXL 111.8 vs 71.8 ms, docs/BENCHMARKS.md sixth session), so a
single pass confounds a variant with its position. The thirteenth session found why: those hosts are
virtual machines whose CPU speed drifts (bf16 SDXL eager 50-85 ms between processes, no Octet code
involved). For eager ratios of host-bound models use bench/eager_paired.py, which times the variants
round by round in one process; graph and compile rows, GPU-bound, are not affected the same way.

Writes a JSON and a markdown table (to --out, default out/e2e) and prints the card's name.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SD35_MEDIUM = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
               "adm_in_channels": 2048, "pos_embed_max_size": 384, "num_patches": 384 * 384,
               "context_embedder_config": {"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 1536}},
               "qk_norm": "rms", "pos_embed_scaling_factor": None, "x_block_self_attn_layers": list(range(13))}
WAN21_13B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "in_dim": 16, "out_dim": 16,
             "ffn_dim": 8960, "freq_dim": 256, "num_heads": 12, "num_layers": 30, "patch_size": (1, 2, 2),
             "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}

# name -> (supported_models class, unet_config, latent shape, conditioning shapes)
MODELS = {
    "flux-dev": ("Flux", FLUX_DEV, (1, 16, 128, 128), {"c_crossattn": (1, 512, 4096), "y": (1, 768),
                                                       "guidance": (1,)}),
    "sdxl": ("SDXL", SDXL, (1, 4, 128, 128), {"c_crossattn": (1, 77, 2048), "y": (1, 2816)}),
    "sd1.5": ("SD15", SD15, (1, 4, 64, 64), {"c_crossattn": (1, 77, 768)}),
    "sd3.5-medium": ("SD3", SD35_MEDIUM, (1, 16, 128, 128), {"c_crossattn": (1, 333, 4096), "y": (1, 2048)}),
    "wan2.1-1.3b": ("WAN21_T2V", WAN21_13B, (1, 16, 9, 60, 104), {"c_crossattn": (1, 512, 4096)}),
}
TINY = {  # same classes, shrunken, so --tiny checks every code path on a CPU in seconds
    "flux-dev": {"hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
                 "context_in_dim": 32, "vec_in_dim": 16},
    "sdxl": {"model_channels": 32, "transformer_depth": [0, 0, 1, 1], "channel_mult": [1, 2],
             "num_res_blocks": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
             "context_dim": 32, "adm_in_channels": 64, "num_head_channels": 16},
    "sd1.5": {"model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
              "transformer_depth": [1, 1, 1, 1], "transformer_depth_output": [1, 1, 1, 1],
              "context_dim": 32, "num_heads": 2},
    "sd3.5-medium": {"depth": 2, "context_embedder_config": {"target": "torch.nn.Linear",
                                                             "params": {"in_features": 32, "out_features": 128}},
                     "adm_in_channels": 32, "pos_embed_max_size": 16, "num_patches": 256,
                     "x_block_self_attn_layers": [0]},
    "wan2.1-1.3b": {"dim": 128, "ffn_dim": 256, "num_heads": 2, "num_layers": 1, "text_dim": 32},
}
TINY_SHAPES = {"flux-dev": ((1, 16, 16, 16), {"c_crossattn": (1, 8, 32), "y": (1, 16), "guidance": (1,)}),
               "sdxl": ((1, 4, 16, 16), {"c_crossattn": (1, 8, 32), "y": (1, 64)}),
               "sd1.5": ((1, 4, 16, 16), {"c_crossattn": (1, 8, 32)}),
               "sd3.5-medium": ((1, 16, 16, 16), {"c_crossattn": (1, 8, 32), "y": (1, 32)}),
               "wan2.1-1.3b": ((1, 16, 2, 8, 8), {"c_crossattn": (1, 8, 32)})}
# octet_static_layers: static W8A8 with the MLP chains off (OCTET_FUSED_MLP=0), each layer on its own;
# octet_dynamic_layers: dynamic W8A8 with the host's GELU pass after each MLP's fc1 (no GELU epilogue).
# octet_dynamic_dispatch: every Triton launch through Triton's own dispatch (OCTET_FAST_LAUNCH=0, see
# kernels/backends/triton_launch.py), for before/after rows in one call.
# octet_dynamic_not_deferred: GELUs and LayerNorms computed in float before their INT8 layer (OCTET_DEFERRED=0,
# see octet/deferred.py; Flux's q/k preparation too).
# bf16_octet_qk: the bf16 model with only Octet's fused q/k preparation (octet/deferred.py install_qk: QK
# RMSNorm + RoPE in one kernel), no INT8: what that part of Octet's speed owes to quantization (nothing).
# bf16_octet_fused: the bf16 model with all of Octet's float fusions (install_qk, and octet/float_fusions.py:
# GroupNorm + SiLU, GEGLU's gate), no INT8. octet_dynamic_host_float: octet_dynamic with the host's GroupNorms
# and GEGLUs (OCTET_FLOAT_FUSIONS=0).
# The variant suffix -> the Octet switches it turns off. OCTET_FUSED_MLP: static MLP chains; OCTET_FAST_LAUNCH and
# OCTET_C_LAUNCH (Triton's Python launcher instead of its C function, kernels/backends/triton_launch.py; with
# OCTET_SCRATCH, fresh allocations for each layer's codes and scales: _pylaunch is the host path before
# 2026-12-02's sixth session): read when each layer plans, at its first call (the warm-up steps);
# octet_dynamic_separate_qkv / octet_static_separate_qkv: attention projections that read one input each run their own GEMM, as before
# octet/shared_input.py (OCTET_SHARED_INPUT=0, read when the model is quantized).
# octet_dynamic_memory: Quantize Model's memory goal (no float weight copies; SD3's position table in int8,
# octet/tables.py), the goal issue 13's weight target names.
# OCTET_DEFERRED (GELUs and LayerNorms computed in float before their INT8 layer, as before octet/deferred.py)
# and OCTET_FLOAT_FUSIONS: read per call. octet_dynamic_not_lean: the UNet's transformer stacks through the host's
# forwards (OCTET_LEAN_BLOCKS=0, read when the model is quantized: octet/lean_blocks.py); bf16_octet_lean: the bf16
# model with only those lean stacks (what that part of Octet's eager speed owes to quantization: nothing).
# octet_dynamic_not_compile_fused: compiled graphs keep the host's float ops around each INT8 layer
# (OCTET_COMPILE_FUSIONS=0, read at each compile: octet/compile_pass.py). octet_dynamic_divided: the GELU and norm
# row quantizers' codes by the division, not the scale's reciprocal (OCTET_RECIP_CODES=0, read when a call site's
# quantizer is made).
SWITCH_OFF = {"_layers": ("OCTET_FUSED_MLP",), "_dispatch": ("OCTET_FAST_LAUNCH",),
              "_not_deferred": ("OCTET_DEFERRED",), "_host_float": ("OCTET_FLOAT_FUSIONS",),
              "_pylaunch": ("OCTET_C_LAUNCH", "OCTET_SCRATCH"), "_separate_qkv": ("OCTET_SHARED_INPUT",),
              "_not_lean": ("OCTET_LEAN_BLOCKS",), "_not_compile_fused": ("OCTET_COMPILE_FUSIONS",),
              "_divided": ("OCTET_RECIP_CODES",)}
# The variant suffix -> the Octet switches, off by default, it turns on. octet_dynamic_residual: the compile pass with
# Flux's gated residuals in the GEMM epilogue (OCTET_COMPILE_RESIDUAL=1, read at each compile).
# octet_dynamic_rope_table: each EmbedND's RoPE table as eager kernels inside compiled graphs
# (OCTET_COMPILE_ROPE_TABLE=1, read when the model is quantized: octet/rope_table.py).
SWITCH_ON = {"_residual": ("OCTET_COMPILE_RESIDUAL",), "_rope_table": ("OCTET_COMPILE_ROPE_TABLE",)}
SWITCHES = sorted({name for table in (SWITCH_OFF, SWITCH_ON) for names in table.values() for name in names})
# octet_dynamic_sdpa / _flash / _cudnn: the lean forwards call the host's SDPA, or PyTorch's flash / cuDNN attention
# op directly (OCTET_ATTENTION_OP, read when the model is quantized: octet/lean_blocks.py attention_op; by default a
# UNet's stacks call flash's, SD3's joint blocks SDPA).
ATTENTION_OPS = ("_sdpa", "_flash", "_cudnn")
# _int8attn (any variant, bf16 too): the INT8 Attention node's override in the step's transformer_options
# (octet/attention.py): every attention call with q·kᵀ in int8.
INT8_ATTENTION = "_int8attn"
VARIANTS = ("bf16", "host_fp8_e4m3fn_fast", "octet_weight_only", "octet_dynamic", "octet_static",
            "octet_static_layers", "octet_dynamic_dispatch", "octet_dynamic_not_deferred", "bf16_octet_qk",
            "bf16_octet_fused", "octet_dynamic_host_float", "octet_dynamic_pylaunch", "octet_dynamic_memory",
            "octet_dynamic_separate_qkv", "octet_static_separate_qkv", "octet_dynamic_not_lean", "bf16_octet_lean",
            "octet_dynamic_sdpa", "octet_dynamic_flash", "octet_dynamic_cudnn", "octet_dynamic_layers",
            "octet_dynamic_all_int8", "bf16_int8attn", "octet_dynamic_int8attn", "octet_static_int8attn",
            "octet_dynamic_not_compile_fused", "octet_dynamic_residual", "octet_dynamic_divided",
            "octet_dynamic_rope_table")


def attention_kw(variant: str, kw: dict) -> dict:
    """The step's keyword arguments for ``variant``: with the INT8 attention override if it ends in _int8attn."""
    if not variant.endswith(INT8_ATTENTION):
        return kw
    from comfyui_octet.octet import attention
    options = dict(kw.get("transformer_options") or {}, **{attention.OPTION: attention.Int8Attention()})
    return dict(kw, transformer_options=options)


def model_config(name: str, tiny: bool, extra: dict | None = None):
    """The host's supported-model config for ``name``; on hosts whose FluxParams needs fields these
    configs predate (0.29's txt_ids_dims), the value the host's own detection gives Flux.1."""
    import comfy.supported_models
    from comfyui_octet.nodes import host_compat

    cls_name, unet, _, _ = MODELS[name]
    unet = {**unet, **(TINY[name] if tiny else {}), **(extra or {})}
    if unet.get("image_model") == "flux":
        from comfy.ldm.flux.model import FluxParams
        filled = host_compat.complete_dataclass_kwargs(FluxParams, unet, name)
        unet.update({k: v for k, v in filled.items() if k not in unet})
    return getattr(comfy.supported_models, cls_name)(unet)


def build(name: str, variant: str, device, tiny: bool):
    """ComfyUI's model for ``name``, weights initialised on ``device`` (fp8 variant: host fp8 ops)."""
    import torch

    config = model_config(name, tiny)
    if variant == "host_fp8_e4m3fn_fast":
        config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
        config.optimizations["fp8"] = True
    else:
        config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, "", device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in list(model.diffusion_model.parameters()) + list(model.diffusion_model.buffers()):
            if not p.is_floating_point():
                continue
            tmp = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
            if p.dim() >= 2:
                tmp.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                tmp.normal_(0.0, 0.02, generator=g)
            p.copy_(tmp)
    model.to(device)
    return model.eval()


def inputs(name: str, device, tiny: bool):
    import torch
    g = torch.Generator(device=device).manual_seed(1)
    latent, conds = TINY_SHAPES[name] if tiny else MODELS[name][2:]
    x = torch.randn(latent, device=device, generator=g, dtype=torch.bfloat16)
    kw = {k: torch.randn(s, device=device, generator=g, dtype=torch.bfloat16) for k, s in conds.items()}
    if "guidance" in kw:
        kw["guidance"] = torch.full_like(kw["guidance"], 3.5)
    sigma = torch.tensor([0.6], device=device)
    return x, sigma, kw


def weight_bytes(module) -> int:
    """The state dict's bytes, and the row scales an int8 position table keeps beside it (octet/tables.py)."""
    from comfyui_octet.octet import tables
    return (sum(t.numel() * t.element_size() for t in module.state_dict().values())
            + sum(tables.table_bytes(crop) for crop in tables.crops(module).values()))


def quantize(model, variant: str, x, sigma, kw):
    """Octet's one verb on the diffusion model, in place; static calibrates on one step first."""
    import torch
    from comfyui_octet import octet
    from comfyui_octet.octet.calibration import record
    from comfyui_octet.octet.timestep import GroupSelector

    dm = model.diffusion_model
    calibration = None
    mode = variant[len("octet_"):]
    goal = "memory" if mode.endswith("_memory") else "speed"    # _memory: issue 13's weight-size goal
    mode = mode.removesuffix("_memory")
    # _all_int8: every W8A8 linear on Triton's INT8 kernels, the cost model's "float is faster here" overruled (Wan's
    # 1536-wide projections: does INT8 lose there, as the model says?).
    all_int8 = mode.endswith("_all_int8")
    mode = mode.removesuffix("_all_int8")
    os.environ.pop("OCTET_ATTENTION_OP", None)
    for suffix in ATTENTION_OPS:
        if mode.endswith(suffix):
            os.environ["OCTET_ATTENTION_OP"] = suffix[1:]
            mode = mode.removesuffix(suffix)
    # Every switch at its default (SWITCH_OFF's on, SWITCH_ON's off), except those the variant's suffixes name.
    for table, named, default in ((SWITCH_OFF, "0", "1"), (SWITCH_ON, "1", "0")):
        for suffix, switches in table.items():
            for switch in switches:
                os.environ[switch] = named if mode.endswith(suffix) else default
            mode = mode.removesuffix(suffix)
    from comfyui_octet.kernels.backends import scratch
    scratch.read_environment()   # the module reads it at import, not per call
    if mode == "static":
        with torch.no_grad(), record(dm, GroupSelector([]), sample_cap=4096) as calibration:
            model.apply_model(x, sigma, **kw)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = octet.quantize_(dm, octet.config_for_mode(mode, goal=goal), calibration=calibration)
    if all_int8:
        for layer in result.replacements.values():
            if getattr(layer, "kind", None) == "linear" and layer.act != "none":
                layer.backend = "triton"
                layer.invalidate()
    os.environ.pop("OCTET_ATTENTION_OP", None)
    sync()
    return result, time.perf_counter() - t0


def lean_install(dm) -> list[str]:
    """bf16_octet_lean: the UNet's transformer stacks lean (octet/lean_blocks.py), nothing else of Octet."""
    from comfyui_octet.octet import lean_blocks
    os.environ["OCTET_LEAN_BLOCKS"] = "1"
    return lean_blocks.install(dm)


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def through_graph_step(patcher, x, sigma, kw, warmup: int, iters: int, load=None) -> dict:
    """Steps of ``patcher``'s model through CUDA Graph Step (nodes/graph_step.py), called as a sampler calls
    them (the wrapper reads the patcher's load state): the first call warms up and captures, the timed calls
    replay. ``load(clone)``, if given, runs before the first step (a host loader that places the wrapped clone).
    Returns capture_s, the timed steps' seconds, the graphs' bytes and stats, and the node's report."""
    import torch
    import comfy.patcher_extension as pe
    from comfyui_octet.nodes import graph_step

    clone, step = graph_step.install(patcher)
    if load is not None:
        load(clone)
    model = clone.model
    model.current_patcher = clone
    options = dict(kw.get("transformer_options") or {}, wrappers=pe.copy_nested_dicts(clone.wrappers),
                   cond_or_uncond=[0], sigmas=sigma)
    graph_kw = dict(kw, transformer_options=options)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs a prompt
            model.apply_model(x, sigma, **graph_kw)
        sync()
        capture_s = time.perf_counter() - t0
        times = time_steps(model, x, sigma, graph_kw, warmup, iters, inference=True)
        return {"capture_s": capture_s, "times": times, "graph_bytes": step.cache.bytes,
                "graph_stats": dict(step.stats), "report": step.report()}
    finally:
        model.current_patcher = None
        step.cache.clear()


def graph_rows(model, row, x, sigma, kw, device, args) -> dict:
    """The same step through CUDA Graph Step, driven by a ModelPatcher of the built model."""
    import torch
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    out = dict(row, mode="graph")
    out.pop("compile_s", None)
    out.pop("host_issue_ms", None)   # the eager row's: a replayed graph's host time is not measured here
    out.pop("host_cpu_ms", None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = through_graph_step(patcher, x, sigma, kw, args.warmup, args.iters)
    out["capture_s"] = g["capture_s"]
    out["step_ms"] = statistics.median(g["times"]) * 1000
    out["graph_bytes"], out["graph_stats"] = g["graph_bytes"], g["graph_stats"]
    if device.type == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    print(g["report"], flush=True)
    return out


class GcLog:
    """Python's garbage collections while it is installed (``with GcLog() as log``): count and seconds per
    generation. Why: an eager step is host-bound, and a full collection walks every live Python object (a
    process holding ComfyUI, torch, Triton's compiled kernels and a quantized model's layers); the eager steps
    of a process's first quantized variant, and of variants timed after others, ran slower with host CPU time =
    step time (docs/BENCHMARKS.md, sixth and eleventh sessions), which collections after quantization would
    explain. The timed steps' collections go into each eager row."""

    def __init__(self):
        self.count, self.seconds, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._start

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def ms_per_step(self, steps: int) -> float:
        return sum(self.seconds) * 1000 / steps


def time_steps(model, x, sigma, kw, warmup: int, iters: int, inference: bool = False,
               issued: list | None = None, cpu: list | None = None, gc_log: GcLog | None = None,
               main_cpu: list | None = None) -> list[float]:
    """Seconds per step (GPU work included); ``issued`` gets the seconds until apply_model returned, before the
    GPU finished: where it is about the step's time, the step is host-bound (the GPU waits for launches).
    ``cpu`` gets the process's CPU seconds in that call: the host work itself, which other tenants of a shared
    GPU host do not stretch as they stretch wall time (seen: bf16 SDXL eager 58 to 96 ms between calls).
    ``gc_log`` records the garbage collections during the timed steps (not the warm-up). ``main_cpu`` gets this
    thread's CPU seconds alone: where it is well under ``cpu``, other threads of the process (compilers, a
    spinning worker) burn the difference, not the step's own Python."""
    import contextlib
    import torch
    times = []
    with torch.inference_mode() if inference else torch.no_grad():
        for i in range(warmup + iters):
            sync()
            with gc_log if gc_log is not None and i >= warmup else contextlib.nullcontext():
                m0, c0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
                model.apply_model(x, sigma, **kw)
                t1, c1, m1 = time.perf_counter(), time.process_time(), time.thread_time()
                sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                if issued is not None:
                    issued.append(t1 - t0)
                if cpu is not None:
                    cpu.append(c1 - c0)
                if main_cpu is not None:
                    main_cpu.append(m1 - m0)
    return times


def rusage_per_step(before, after, steps: int) -> dict:
    """The kernel's account of the steps between two ``getrusage`` calls, per step: user and system CPU ms (a
    host whose time goes to the kernel, to page faults or memory maps, shows in ``sys``), minor page faults,
    and involuntary context switches (the CPU taken away: another tenant, or more runnable threads than cores)."""
    return {"user_ms_per_step": (after.ru_utime - before.ru_utime) * 1000 / steps,
            "sys_ms_per_step": (after.ru_stime - before.ru_stime) * 1000 / steps,
            "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "involuntary_switches_per_step": (after.ru_nivcsw - before.ru_nivcsw) / steps}


def profile_step(model, x, sigma, kw) -> str:
    """Where one step's time goes: CPU-side (launch) vs GPU kernel time, top ops by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model.apply_model(x, sigma, **kw)
        sync()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1000
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60)
    # The CUDA runtime calls (launches, allocations, copies, synchronizations) by host time: a step that
    # waits for the GPU (a synchronizing copy, an allocator's cudaFree) shows here, not in the GPU table.
    runtime = sorted((e for e in events if e.key.startswith("cuda") or e.key in ("aten::item", "aten::_local_scalar_dense")),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    calls = "\n".join(f"  {e.key:<40} {e.count:6d} calls  host {e.self_cpu_time_total / 1000:8.2f} ms" for e in runtime)
    cpu_total = sum(e.self_cpu_time_total for e in events) / 1000
    # Host time per op (own and with its children, per call): where a step's issue time goes, e.g. whether the same
    # aten::linear costs more host time in one model's step than in another's.
    host = sorted((e for e in events if e.key.startswith("aten::") or e.key.startswith("octet")),
                  key=lambda e: e.cpu_time_total, reverse=True)[:20]
    ops = "\n".join(f"  {e.key:<40} {e.count:6d} calls  host {e.cpu_time_total / 1000:8.2f} ms total "
                    f"({e.cpu_time_total / max(e.count, 1):6.1f} us/call, own {e.self_cpu_time_total / max(e.count, 1):6.1f})"
                    for e in host)
    shaped = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::linear"),
                    key=lambda e: e.cpu_time_total, reverse=True)[:12]
    linear = "\n".join(f"  {str(e.input_shapes)[:70]:<70} {e.count:5d} calls {e.cpu_time_total / max(e.count, 1):6.1f} us/call"
                        for e in shaped)
    return (f"GPU kernel time in the step: {gpu_total:.1f} ms; host (profiler's own time) {cpu_total:.1f} ms\n{table}\n"
            f"CUDA runtime calls by host time:\n{calls}\nATen ops by host time (with children):\n{ops}\n"
            f"aten::linear by input shapes (host time with children):\n{linear}")


def cprofile_steps(model, x, sigma, kw, steps: int = 3, top: int = 25) -> str:
    """Where the host time of eager steps goes, Python function by function (own time)."""
    import cProfile
    import io
    import pstats
    import torch
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(steps):
            model.apply_model(x, sigma, **kw)
        sync()
        prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    # Own time summed per source file: which package's Python the host time is spent in.
    per_file: dict = {}
    for (filename, _, _), (_, ncalls, own, _, _) in stats.stats.items():
        key = filename if filename.startswith("~") else "/".join(filename.split("/")[-2:])
        calls, seconds = per_file.get(key, (0, 0.0))
        per_file[key] = (calls + ncalls, seconds + own)
    text.write(f"own time per file, ms per step ({steps} steps):\n")
    for key, (calls, seconds) in sorted(per_file.items(), key=lambda kv: -kv[1][1])[:top]:
        text.write(f"  {seconds * 1e3 / steps:8.2f} ms {calls // steps:7d} calls  {key}\n")
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())


def _compile_row(model, row, x, sigma, kw, device, args) -> dict:
    """The same model through torch.compile (Inductor), as the host's TorchCompileModel does; Octet's
    layers are one opaque custom op each (kernels/ops.py), so the graph has no break at them."""
    import torch
    out = dict(row, mode="compile", variant=row["variant"] + f"+compile({args.compile_mode})")
    out.pop("capture_s", None)
    # Each variant compiles from scratch, as in its own process: dynamo's per-function recompile limit counts the
    # earlier variants' models (the sixth tiny compile of one run, SDXL's, stepped in 5.4 s instead of 16 ms).
    torch._dynamo.reset()
    t0 = time.perf_counter()
    model.diffusion_model = torch.compile(model.diffusion_model, mode=args.compile_mode)
    time_steps(model, x, sigma, kw, 1, 0)
    out["compile_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    issued: list = []
    out["step_ms"] = statistics.median(time_steps(model, x, sigma, kw, args.warmup, args.iters, issued=issued)) * 1000
    out["host_issue_ms"] = statistics.median(issued) * 1000   # this compiled step's, as the eager row's
    if device.type == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        if args.profile:
            out["profile"] = profile_step(model, x, sigma, kw)
            print(f"[{torch.cuda.get_device_name()}] profile {out['model']} {out['variant']}\n{out['profile']}",
                  flush=True)
    return out


def run_variant(name, variant, device, args) -> list[dict]:
    """One model built (and quantized) once, timed in each requested mode: eager, graph, compile."""
    import torch
    modes = args.modes
    row = {"model": name, "variant": variant, "mode": "eager", "card": args.card, "versions": args.versions}
    model = build(name, "host_fp8_e4m3fn_fast" if variant == "host_fp8_e4m3fn_fast" else "bf16", device, args.tiny)
    x, sigma, kw = inputs(name, device, args.tiny)
    kw = attention_kw(variant, kw)
    variant = variant.removesuffix(INT8_ATTENTION)      # the rest as without it
    if variant.startswith("octet_"):
        result, row["quantize_s"] = quantize(model, variant, x, sigma, kw)
        row["layers_quantized"] = len(result.quantized)
        row["mlp_chains"] = len(result.chains) if not variant.endswith("_layers") else 0
        row["deferred_inputs"] = len(result.gelus) + len(result.norms)
        row["qk_fused"] = len(result.qk_norms)
        row["float_fusions"] = len(result.float_fusions)
        row["qkv_groups"] = len(result.fused_groups)
        row["lean_stacks"] = len(result.lean_blocks)
    elif variant == "bf16_octet_qk":
        from comfyui_octet.octet import deferred
        os.environ["OCTET_DEFERRED"] = "1"
        row["qk_fused"] = len(deferred.install_qk(model.diffusion_model))
    elif variant == "bf16_octet_fused":
        from comfyui_octet.octet import deferred, float_fusions
        os.environ["OCTET_DEFERRED"] = os.environ["OCTET_FLOAT_FUSIONS"] = "1"
        row["qk_fused"] = len(deferred.install_qk(model.diffusion_model))
        row["float_fusions"] = len(float_fusions.install(model.diffusion_model))
    elif variant == "bf16_octet_lean":
        row["lean_stacks"] = len(lean_install(model.diffusion_model))
    row["weight_bytes"] = weight_bytes(model.diffusion_model)
    rows = []
    if "eager" in modes or "graph" in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        issued, cpu, main_cpu, collections = [], [], [], GcLog()
        if args.gc_freeze or args.gc_collect:
            row["gc_collected"] = gc.collect()   # unreachable objects found: what quantization left behind
        if args.gc_freeze:
            gc.freeze()     # everything alive now leaves the collector's view: later collections skip it
        time_steps(model, x, sigma, kw, args.warmup, 0)    # warm-up apart: its autotuning is not the steps' rusage
        usage = resource.getrusage(resource.RUSAGE_SELF)
        times = time_steps(model, x, sigma, kw, 0, args.iters, issued=issued, cpu=cpu, gc_log=collections,
                           main_cpu=main_cpu)
        row.update(rusage_per_step(usage, resource.getrusage(resource.RUSAGE_SELF), args.iters))
        if args.gc_freeze:
            gc.unfreeze()
            row["gc_frozen"] = True
        row["step_ms"] = statistics.median(times) * 1000
        row["host_issue_ms"] = statistics.median(issued) * 1000
        row["host_cpu_ms"] = statistics.median(cpu) * 1000
        row["main_thread_cpu_ms"] = statistics.median(main_cpu) * 1000
        row["threads"] = threading.active_count()
        row["os_threads"] = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
        row["step_ms_mean"] = statistics.fmean(times) * 1000
        row["gc_collections"] = collections.count
        row["gc_ms_per_step"] = collections.ms_per_step(len(times))
        card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"[{card}] {name} {row['variant']} eager: step {row['step_ms']:.1f} ms (mean {row['step_ms_mean']:.1f}), "
              f"of which the host issued the step in {row['host_issue_ms']:.1f} ms ({row['host_cpu_ms']:.1f} ms of "
              f"CPU, {row['main_thread_cpu_ms']:.1f} in this thread; {row['os_threads']} threads); "
              f"garbage collections in {len(times)} steps (gen 0/1/2): {collections.count}, "
              f"{row['gc_ms_per_step']:.2f} ms per step; per step {row['user_ms_per_step']:.1f} ms user, "
              f"{row['sys_ms_per_step']:.1f} ms system, {row['minor_faults_per_step']:.0f} page faults, "
              f"{row['involuntary_switches_per_step']:.1f} involuntary switches"
              + (f"; gc.collect() found {row['gc_collected']} objects" if "gc_collected" in row else ""), flush=True)
        if args.cprofile:
            row["cprofile"] = cprofile_steps(model, x, sigma, kw)
            print(f"cProfile {name} {row['variant']} (3 eager steps, by own time)\n{row['cprofile']}", flush=True)
        if args.profile and device.type == "cuda":
            row["profile"] = profile_step(model, x, sigma, kw)
            print(f"[{torch.cuda.get_device_name()}] profile {name} {row['variant']}\n{row['profile']}", flush=True)
        if device.type == "cuda":
            row["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        if "eager" in modes:
            rows.append(row)
    if "graph" in modes:
        rows.append(graph_rows(model, row, x, sigma, kw, device, args))
    if "compile" in modes and variant in args.compile_variants and name in args.compile_models:
        if args.past_deadline():
            rows.append(dict(row, mode="compile", error="skipped: --deadline reached before compiling"))
            rows[-1].pop("step_ms", None)
        else:
            rows.append(_compile_row(model, row, x, sigma, kw, device, args))
            if "compile_graph" in modes and device.type == "cuda":
                compiled_graph = graph_rows(model, rows[-1], x, sigma, kw, device, args)
                rows.append(dict(compiled_graph, mode="compile_graph"))
    del model
    gc.collect()    # as ComfyUI does when it drops a model: reference cycles would keep GPU memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def merge_rounds(measured: list[dict], variants) -> list[dict]:
    """One row per (variant, mode) in the requested variant order: the first round's row with step_ms the
    median over the rounds that measured it (all values in step_ms_rounds, in round order); an error row
    only where no round measured it."""
    groups: dict = {}
    for row in measured:
        groups.setdefault((row["variant"], row.get("mode")), []).append(row)
    merged = []
    # A compile row's variant is named "<variant>+compile(<mode>)": it sorts with its variant.
    order = lambda kv: variants.index(kv[0][0].split("+compile")[0])  # noqa: E731
    for (variant, _), group in sorted(groups.items(), key=order):
        timed = [row for row in group if "step_ms" in row]
        if not timed:
            merged.append(group[0])
            continue
        row = dict(timed[0])
        if len(group) > 1:
            row["step_ms_rounds"] = [round(r["step_ms"], 3) for r in timed]
            row["step_ms"] = statistics.median(r["step_ms"] for r in timed)
            for key in ("host_issue_ms", "host_cpu_ms", "main_thread_cpu_ms", "gc_ms_per_step"):
                if all(key in r for r in timed):
                    row[f"{key}_rounds"] = [round(r[key], 3) for r in timed]
                    row[key] = statistics.median(r[key] for r in timed)
        row.pop("round", None)
        merged.append(row)
    return merged


def markdown(rows, header) -> str:
    """vs bf16: against bf16 eager (compiled bf16 for compiled rows, compiled or not through the graph step);
    vs bf16 graph: against the bf16 row of the same graph step, so the ratio holds only what Octet changes."""
    lines = [header, "", "| model | variant | mode | step ms | vs bf16 | vs bf16 graph | weights GiB | vs bf16 | "
             "peak VRAM GiB | quantize s | capture / compile s | host CPU ms | GC ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r.get("mode", "eager")): r for r in rows
            if (r["variant"] == "bf16" or r["variant"].startswith("bf16+")) and "step_ms" in r}
    for r in rows:
        mode = r.get("mode", "eager")
        # A compiled graph step's "vs bf16" is against compiled bf16 (issue 13's compiled target), "vs bf16 graph"
        # against bf16's compiled graph step.
        b = base.get((r["model"], {"graph": "eager", "compile_graph": "compile"}.get(mode, mode)))
        g = base.get((r["model"], mode)) if mode in ("graph", "compile_graph") else None
        if "step_ms" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {mode} | failed: {r.get('error', '?')[:80]} "
                         f"| | | | | | | | | |")
            continue
        speed = f"{b['step_ms'] / r['step_ms']:.2f}x" if b else "n/a"
        same = f"{g['step_ms'] / r['step_ms']:.2f}x" if g else ""
        size = f"{r['weight_bytes'] / b['weight_bytes']:.3f}x" if b else "n/a"
        peak = f"{r['peak_vram_bytes'] / 2**30:.2f}" if "peak_vram_bytes" in r else "n/a"
        quant = f"{r['quantize_s']:.1f}" if "quantize_s" in r else ""
        capture = (f"{r['capture_s']:.2f}" if "capture_s" in r
                   else f"{r['compile_s']:.0f}" if "compile_s" in r else "")
        cpu = f"{r['host_cpu_ms']:.1f}" if "host_cpu_ms" in r else ""
        collect = f"{r['gc_ms_per_step']:.2f}" if "gc_ms_per_step" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {mode} | {r['step_ms']:.1f} | {speed} | {same} | "
                     f"{r['weight_bytes'] / 2**30:.2f} | {size} | {peak} | {quant} | {capture} | {cpu} | {collect} |")
    return "\n".join(lines)


def comfy_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # noqa: BLE001 - older hosts have no version module
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", default=None, choices=("eager", "graph", "compile", "compile_graph"),
                        help="what to time per variant (default: eager; --graph adds graph, --compile is compile only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the diffusion model (= --modes compile)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default (what the host's TorchCompileModel uses), "
                             "max-autotune-no-cudagraphs (minutes of Inductor autotuning per shape), reduce-overhead")
    parser.add_argument("--compile-variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="variants to compile in --modes ... compile (default: all requested)")
    parser.add_argument("--compile-models", nargs="+", default=None, choices=list(MODELS),
                        help="models to compile in --modes ... compile (default: all requested)")
    parser.add_argument("--graph", action="store_true",
                        help="also time each variant through CUDA Graph Step (= --modes eager graph)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new variant or compile is started (rows so far are kept)")
    parser.add_argument("--cprofile", action="store_true", help="print a cProfile of 3 eager steps per variant")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant")
    parser.add_argument("--tiny", action="store_true", help="shrunken configs on CPU (smoke test)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variant list this many times, alternating its order; rows report the median")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.collect() + gc.freeze() before each variant's eager steps (see GcLog)")
    parser.add_argument("--gc-collect", action="store_true",
                        help="gc.collect() alone before each variant's eager steps (what --gc-freeze does first)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "e2e"))
    args = parser.parse_args()
    if args.modes is None:
        args.modes = ["compile"] if args.compile else ["eager"] + (["graph"] if args.graph else [])
    if "compile_graph" in args.modes and "compile" not in args.modes:
        args.modes.append("compile")
    args.compile = "compile" in args.modes
    args.graph = "graph" in args.modes
    args.compile_variants = args.compile_variants or args.variants
    args.compile_models = args.compile_models or args.models
    started = time.perf_counter()
    args.past_deadline = lambda: args.deadline is not None and time.perf_counter() - started > args.deadline

    octet_pack.load(comfy=True, cpu=args.tiny)
    import torch
    import triton

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.card = card
    args.versions = {"torch": torch.__version__, "triton": triton.__version__, "comfyui": comfy_version(),
                     "python": platform.python_version()}
    header = (f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; "
              f"{' + '.join(args.modes)}"
              f"{f' (torch.compile mode {args.compile_mode})' if args.compile else ''}; {stamp}")
    print(header, flush=True)
    os.makedirs(args.out, exist_ok=True)
    suffix = (("tiny" if args.tiny else "full") + "_" + "_".join(args.modes)
              + (f"_{args.compile_mode}" if args.compile else ""))

    def write(rows):
        table = markdown(rows, header)
        with open(os.path.join(args.out, f"e2e_{suffix}.json"), "w") as f:
            json.dump({"header": header, "modes": args.modes, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, f"e2e_{suffix}.md"), "w") as f:
            f.write(table + "\n")
        return table

    rows = []
    for name in args.models:
        measured = []   # this model's rows from every round
        for r in range(max(1, args.rounds)):
            order = args.variants if r % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                if variant == "host_fp8_e4m3fn_fast" and device.type != "cuda":
                    continue
                if args.past_deadline():
                    measured.append({"model": name, "variant": variant, "error": "skipped: --deadline reached"})
                    continue
                try:
                    new = run_variant(name, variant, device, args)
                except Exception as e:  # one broken variant must not hide the others' numbers
                    traceback.print_exc()
                    new = [{"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"}]
                for row in new:
                    row["round"] = r
                    print(f"[{card}] " + json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
                measured += new
                write(rows + merge_rounds(measured, args.variants))
        rows += merge_rounds(measured, args.variants)
    print(write(rows))
    print(f"[{card}] e2e wall {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if all("step_ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
