"""bench/eager_paired.py: the speed-up is the median over rounds of the baseline's step / the variant's step in
the same round, so a drift of the host's speed that slows every variant of a round alike leaves it unchanged."""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _paired_module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_eager_paired", os.path.join(ROOT, "bench", "eager_paired.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def test_paired_ratio_ignores_a_drift_that_slows_whole_rounds():
    paired = _paired_module().paired
    drift = [1.0, 1.7, 1.2, 2.0, 1.0, 1.5]            # the host's speed, round by round
    times = {"bf16": [0.050 * d for d in drift], "octet_dynamic": [0.040 * d for d in drift]}
    stats = paired(times, "bf16")
    assert abs(stats["octet_dynamic"]["speedup_vs_bf16"] - 1.25) < 1e-12
    assert abs(stats["octet_dynamic"]["speedup_q1"] - 1.25) < 1e-12 and abs(stats["octet_dynamic"]["speedup_q3"] - 1.25) < 1e-12
    assert stats["bf16"]["speedup_vs_bf16"] == 1.0
    # The step medians themselves carry the drift (50 ms x the median drift, 1.35).
    assert abs(stats["bf16"]["step_ms"] - 50.0 * 1.35) < 1e-9 and stats["octet_dynamic"]["step_ms_min"] == 40.0


def test_paired_ratio_is_per_round():
    paired = _paired_module().paired
    times = {"bf16": [0.050, 0.100, 0.050], "octet_dynamic": [0.100, 0.050, 0.050]}   # 0.5x, 2x, 1x
    stats = paired(times, "bf16")["octet_dynamic"]
    assert stats["speedup_vs_bf16"] == 1.0 and stats["speedup_q1"] == 0.75 and stats["speedup_q3"] == 1.5
    assert stats["rounds"] == 3


def test_the_lean_variants_build_what_they_name(monkeypatch):
    """``octet_dynamic_not_lean`` is octet_dynamic with the host's transformer stacks, ``bf16_octet_lean`` bf16 with
    only the lean stacks (whatever the switch was left at by the variant before it): rows that isolate what the lean
    stacks give, paired in one process (the switch is read when the model is quantized)."""
    import torch
    _paired_module()
    import e2e
    from comfyui_octet.octet import lean_blocks
    e2e.octet_pack.load(comfy=True, cpu=True)
    # e2e sets the switches in os.environ for the process (as a bench run wants); the tests after this one must
    # not inherit them (OCTET_FLOAT_FUSIONS=1 under the interpreter makes every GroupNorm take a second).
    for name in e2e.SWITCHES:
        monkeypatch.setenv(name, "1")       # (delenv of an unset variable records nothing to restore)
    cpu = torch.device("cpu")
    x, sigma, kw = e2e.inputs("sdxl", cpu, True)
    lean = {}
    for variant in ("octet_dynamic_not_lean", "bf16_octet_lean", "octet_dynamic"):
        model = e2e.build("sdxl", "bf16", cpu, True)
        if variant.startswith("octet_"):
            lean[variant] = e2e.quantize(model, variant, x, sigma, kw)[0].lean_blocks
        else:
            lean[variant] = e2e.lean_install(model.diffusion_model)
        forwards = [m.forward for m in model.diffusion_model.modules() if "forward" in m.__dict__]
        assert sum(isinstance(f, lean_blocks.FORWARDS) for f in forwards) == len(lean[variant])
    stacks = [n for n, m in model.diffusion_model.named_modules() if type(m).__name__ == "SpatialTransformer"]
    assert lean == {"octet_dynamic_not_lean": [], "bf16_octet_lean": sorted(stacks), "octet_dynamic": sorted(stacks)}
    assert len(stacks) == 3          # the tiny SDXL: its middle block and two output blocks


def test_the_attention_op_variants_build_what_they_name(monkeypatch):
    """``octet_dynamic_sdpa`` / ``_flash`` / ``_cudnn``: the lean stacks of each model call the attention op its name
    says (the switch read while that model is quantized, then cleared); plain ``octet_dynamic`` gets the default
    (flash's op for a UNet's stacks)."""
    import torch
    _paired_module()
    import e2e
    from comfyui_octet.octet import lean_blocks
    e2e.octet_pack.load(comfy=True, cpu=True)
    for name in e2e.SWITCHES:
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("OCTET_ATTENTION_OP", raising=False)
    cpu = torch.device("cpu")
    x, sigma, kw = e2e.inputs("sdxl", cpu, True)
    ops = {}
    for variant in ("octet_dynamic_sdpa", "octet_dynamic_cudnn", "octet_dynamic"):
        model = e2e.build("sdxl", "bf16", cpu, True)
        assert e2e.quantize(model, variant, x, sigma, kw)[0].lean_blocks
        found = {getattr(m.forward.sdpa, "name", None) for m in model.diffusion_model.modules()
                 if isinstance(m.__dict__.get("forward"), lean_blocks.SpatialTransformerForward)}
        ops[variant] = found
        assert "OCTET_ATTENTION_OP" not in os.environ
    assert ops == {"octet_dynamic_sdpa": {None}, "octet_dynamic_cudnn": {"cudnn"}, "octet_dynamic": {"flash"}}


def test_per_call_switches_follow_the_variant():
    """A switch read per call (OCTET_FUSED_MLP, OCTET_FLOAT_FUSIONS) is set around each variant's step: off for the
    variant whose suffix names it, on for every other, whatever the previous variant's step left."""
    module = _paired_module()
    assert "octet_dynamic_layers" in module.PAIRABLE
    assert module.per_call_switches("octet_dynamic_layers") == {"OCTET_FUSED_MLP": "0", "OCTET_FLOAT_FUSIONS": "1"}
    assert module.per_call_switches("octet_dynamic_host_float") == {"OCTET_FUSED_MLP": "1",
                                                                   "OCTET_FLOAT_FUSIONS": "0"}
    assert module.per_call_switches("bf16") == {"OCTET_FUSED_MLP": "1", "OCTET_FLOAT_FUSIONS": "1"}


def test_the_wan_variants_build_what_they_name(monkeypatch):
    """On the tiny Wan: ``bf16_octet_fused`` is bf16 with the float fusions (each block's norm1 + modulation, the
    q/k preparation), ``octet_dynamic`` adds the FFN chain whose fc2 takes the block's gated residual,
    ``octet_dynamic_all_int8`` pins every W8A8 linear to the INT8 kernels."""
    import torch
    module = _paired_module()
    import e2e
    from comfyui_octet.octet import float_fusions, fusion
    e2e.octet_pack.load(comfy=True, cpu=True)
    for name in e2e.SWITCHES:
        monkeypatch.setenv(name, "1")
    cpu = torch.device("cpu")
    x, sigma, kw = e2e.inputs("wan2.1-1.3b", cpu, True)
    found = {}
    for variant in ("bf16", "bf16_octet_fused", "octet_dynamic"):
        dm = module.build_variant("wan2.1-1.3b", variant, cpu, True, x, sigma, kw).diffusion_model
        forwards = {n: m.__dict__["forward"] for n, m in dm.named_modules() if "forward" in m.__dict__}
        found[variant] = (sorted(n for n, f in forwards.items() if isinstance(f, float_fusions.NormModulateForward)),
                          sorted(n for n, f in forwards.items() if fusion.is_chain_forward(f)
                                 and f.__func__ is fusion._chain_forward_residual))
    assert found == {"bf16": ([], []), "bf16_octet_fused": (["blocks.0.norm1"], []),
                     "octet_dynamic": (["blocks.0.norm1"], ["blocks.0.ffn"])}
    # octet_dynamic_all_int8: every W8A8 linear pinned to Triton's kernels (the cost model overruled), no other change.
    from comfyui_octet.octet.modules import QuantLinear
    dm = module.build_variant("wan2.1-1.3b", "octet_dynamic_all_int8", cpu, True, x, sigma, kw).diffusion_model
    linears = [m for m in dm.modules() if type(m) is QuantLinear]
    assert linears and {m.backend for m in linears} == {"triton"}
    plain = module.build_variant("wan2.1-1.3b", "octet_dynamic", cpu, True, x, sigma, kw).diffusion_model
    assert {m.backend for m in plain.modules() if type(m) is QuantLinear} == {"auto"}
