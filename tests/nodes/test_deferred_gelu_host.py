"""Deferred inputs on the real host's Flux blocks (the Flux-class reference DiT through Quantize Model and
KSampler): the single blocks' cat(attn, GELU(mlp)) -> linear2 and every block's LayerNorm + modulation ->
qkv / linear1 / MLP fc1 reach the INT8 kernels as their inputs, and each deferred call matches the same
layer on the materialized tensor."""
import pytest
import torch

from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.nodes import bridge
from comfyui_octet.octet import DynamicW8A8Config, deferred, modules

pytestmark = pytest.mark.skipif(triton_support.unavailable_reason() is not None or not triton_support.interpreting(),
                                reason="needs Triton (TRITON_INTERPRET=1 on CPU)")
STEPS = 2


def test_flux_blocks_hand_their_gelu_to_the_int8_layers(monkeypatch, sample_dit):
    dit = rm.load_reference("dit", "plain")
    q, result = bridge.quantize_model(dit, DynamicW8A8Config(backend="triton"))
    dm = dit.model.diffusion_model
    # The single blocks' GELU (into the cat); the double blocks' MLP GELUs stay float (deferred.py says why).
    expected = sorted(f"{n}.mlp_act" for n, m in dm.named_modules() if hasattr(m, "linear2"))
    gelus = result.gelus
    assert len(expected) >= 1 and gelus == expected
    norms = sorted([f"{n}.{a}" for n, m in dm.named_modules() if n.startswith("double_blocks.") and n.count(".") == 1
                    for a in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")]
                   + [f"{n}.pre_norm" for n, m in dm.named_modules() if hasattr(m, "linear2")])
    assert result.norms == norms
    assert all(f"diffusion_model.{n}.forward" in q.object_patches for n in gelus + norms)
    # Only the layers a deferred input reaches need Triton's plans; the others (proj, fc2, modulations, embedders)
    # take the reference backend: the CPU interpreter's GEMMs are most of this test's time.
    others = [layer for name, layer in q.object_patches.items()
              if isinstance(layer, modules.QuantLinear) and not name.endswith(("linear1", "linear2", "qkv", "mlp.0"))]
    assert others
    for layer in others:
        layer.backend = "torch"
        layer.invalidate()

    # At every deferred call, the fused result against the same layer on the materialized input
    # (nn.GELU's and torch.cat's own numbers). Dynamic INT8 is discontinuous, so whole samples are not
    # compared: a last-bit GELU difference that moves one code changes the next layers' rounding, a
    # different draw of the same quantization noise (measured: as far from layered as float is).
    seen = []
    real = modules.QuantLayer._forward_pending

    def checked(self, x):
        fused = real(self, x)
        layered = self.forward(x.materialize())
        kind = "norm" if isinstance(x, deferred.PendingNorm) else "cat" if x.head is not None else "gelu"
        seen.append((kind, (fused - layered).abs().max().item(), layered.abs().max().item()))
        return fused
    monkeypatch.setattr(modules.QuantLayer, "_forward_pending", checked)
    # The double blocks' img_mlp / txt_mlp take their norm2 input in fc1 with the GELU in its epilogue
    # (octet/fusion.py): checked the same way, against the layer and the GELU on the materialized input.
    real_gelu = modules.QuantLinear.forward_gelu

    def checked_gelu(self, x):
        pending = isinstance(x, deferred.PendingNorm) and x.computed is None
        fused = real_gelu(self, x)
        if pending and fused is not None:
            layered = torch.nn.functional.gelu(self.forward(x.materialize()), approximate="tanh")
            seen.append(("norm", (fused - layered).abs().max().item(), layered.abs().max().item()))
        return fused
    monkeypatch.setattr(modules.QuantLinear, "forward_gelu", checked_gelu)
    sample_dit(q, STEPS)
    singles = sum(n.endswith("mlp_act") for n in gelus)
    # Every step, the first too (its plans are made where the deferred input arrives), defers every site:
    # the single blocks with the attn head.
    kinds = [k for k, _, _ in seen]
    assert kinds.count("cat") == singles * STEPS and kinds.count("gelu") == 0
    assert kinds.count("norm") == len(norms) * STEPS
    diffs = sorted(d / m for _, d, m in seen)
    # fp32 on CPU: the kernels' fp32 tanh / rsqrt and torch's differ in the last bit; where that moves an
    # int8 code by one at a tie, the output moves by about one quantization step (< 1% of its range).
    assert diffs[len(diffs) // 2] < 1e-5 and diffs[-1] < 1e-2, diffs


def test_compiled_flux_blocks_take_the_same_inputs_as_eager(sample_dit, monkeypatch):
    """Under torch.compile (the host's TorchCompileModel wrapper) the real host's Flux code, as traced, has the
    patterns octet/compile_pass.py rewrites at every site eager Octet defers: each single block's cat + GELU,
    every qkv / linear1 LayerNorm + modulation, each MLP's fc1 with its norm2 and the GELU of its epilogue (and
    the final layer's norm_final, which eager leaves to the host), every block's gated residual, and on ComfyUI
    0.29 (whose apply_rope is comfy_kitchen's op) every attention's QK norm + cat + RoPE. The layers run the exact torch backend, whose plans
    take no deferred input: their fused calls compute the host's float ops; the q/k op runs eager's kernel. So
    the sample is eager Octet's bit for bit on 0.29; on 0.3.75 (RoPE traced as the host's fp32 ops, eager's q/k
    kernel not in the graph) the unrewritten compiled graph's."""
    import collections

    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention
    import comfy.quant_ops
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfyui_octet.octet import compile_pass
    # The host's CPU attention asks psutil for free memory, a graph break (one graph per block's halves); PyTorch's
    # SDPA, what the host picks on a GPU, keeps each step in one graph, as on a GPU.
    monkeypatch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setenv("OCTET_COMPILE_RESIDUAL", "1")     # the gated residual rewrite too (off by default)
    dit = rm.load_reference("dit", "plain")
    q, result = bridge.quantize_model(dit, DynamicW8A8Config(backend="torch"))
    dm = dit.model.diffusion_model
    attentions = len(dm.double_blocks) + len(dm.single_blocks)
    kinds = collections.Counter()

    def sample_compiled(rewrite):
        def backend(gm, example_inputs):
            if rewrite:
                kinds["qk"] += compile_pass.apply(gm.graph)[1]
                gm.recompile()
            kinds.update((n.args[5], n.args[6], n.args[7] is not None) for n in gm.graph.nodes
                         if n.op == "call_function" and n.target is torch.ops.octet.linear_fused.default)
            return gm.forward
        torch._dynamo.reset()
        try:
            set_torch_compile_wrapper(q, backend=backend)
            return sample_dit(q, 1)
        finally:
            torch._dynamo.reset()
    eager = sample_dit(q, 1)
    plain = sample_compiled(False)
    assert not kinds
    fused = sample_compiled(True)
    assert len(result.chains) >= 2 and len(result.gelus) >= 1
    rope_op = hasattr(comfy.quant_ops, "ck")
    # Every block's gated residual too: x += linear2(...) * gate in each single block (with its cat + GELU input),
    # img / txt += proj(attn) * gate and += fc2(...) * gate in each double block.
    assert kinds == {("gelu", False, True): len(result.gelus), ("norm", True, False): len(result.chains),
                     ("norm", False, False): len(result.norms) - len(result.chains) + 1,
                     ("plain", False, True): 4 * len(dm.double_blocks), "qk": attentions if rope_op else 0}
    assert torch.equal(fused, eager if rope_op else plain)
