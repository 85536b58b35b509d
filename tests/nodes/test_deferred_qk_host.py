"""Flux's q/k preparation (QKNorm's RMSNorms, the double block's cat, apply_rope's RoPE) as one kernel, on the
real host's Flux blocks (the Flux-class reference DiT through KSampler): every attention takes it, each fused
q/k pair matches the host's own apply_rope on the computed tensors, a float model sampled with it matches the
same model without it, and anything else the host does with q or k (a patch between norm and attention, a
pe the kernel cannot read) gets the host's numbers."""
import pytest
import torch

from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.nodes import bridge
from comfyui_octet.octet import DynamicW8A8Config, deferred

pytestmark = pytest.mark.skipif(triton_support.unavailable_reason() is not None or not triton_support.interpreting(),
                                reason="needs Triton (TRITON_INTERPRET=1 on CPU)")
STEPS = 2


def qknorm_names(dm):
    return sorted(n for n, m in dm.named_modules() if type(m).__name__ == "QKNorm")


def flux_math():
    import comfy.ldm.flux.math as flux_math
    return flux_math


@pytest.fixture
def recorded(monkeypatch):
    """Each fused q/k pair next to the host's apply_rope on the same pending tensors, computed."""
    seen = []
    real = deferred.PendingQK.rope_with

    def checked(self, k, freqs):
        out = real(self, k, freqs)
        if out is not None:
            host = flux_math().apply_rope.__wrapped__(self.compute(), k.compute(), freqs)
            for fused, ref in zip(out, host):
                seen.append((len(self.segments), (fused - ref).abs().max().item(), ref.abs().max().item()))
        return out
    monkeypatch.setattr(deferred.PendingQK, "rope_with", checked)
    return seen


def test_every_flux_attention_prepares_q_and_k_in_one_kernel(recorded, sample_dit):
    dit = rm.load_reference("dit", "plain")
    # The INT8 layers on the reference backend: the q/k kernel does not depend on which GEMM wrote qkv, and the
    # interpreted Triton GEMMs took 28 of this test's 33 s.
    q, result = bridge.quantize_model(dit, DynamicW8A8Config(backend="torch"))
    dm = dit.model.diffusion_model
    names = qknorm_names(dm)
    doubles = sum(n.startswith("double_blocks.") for n in names) // 2
    singles = len(names) - 2 * doubles
    assert doubles >= 1 and singles >= 1 and result.qk_norms == names
    assert "QK norms fused" in result.summary()
    assert all(f"diffusion_model.{n}.forward" in q.object_patches for n in names)

    sample_dit(q, STEPS)
    # One fused pair per attention per model call (cond and uncond batched: one call per step), from the first
    # step on (no plan is needed); the double blocks' pairs carry both streams (two segments).
    segments = [s for s, _, _ in recorded]
    assert segments.count(2) == 2 * doubles * STEPS and segments.count(1) == 2 * singles * STEPS
    # fp32 on CPU: the kernel's rsqrt / sums and torch's differ in the last bits only.
    assert max(d / m for _, d, m in recorded) < 1e-5


def test_a_float_model_samples_the_same_with_the_fused_preparation(recorded, sample_dit):
    dit = rm.load_reference("dit", "plain")
    before = sample_dit(dit, STEPS)
    dm = dit.model.diffusion_model
    fused = dit.clone()
    for name in qknorm_names(dm):
        module = dm.get_submodule(name)
        fused.add_object_patch(f"diffusion_model.{name}.forward", deferred.DeferredQKForward(module))
    after = sample_dit(fused, STEPS)
    # q and k of every attention in every model call took the kernel.
    assert len(recorded) == 2 * (len(qknorm_names(dm)) - len(qknorm_names(dm.double_blocks)) // 2) * STEPS
    # The whole sample: float all the way, so only last-bit differences, carried through two steps.
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_what_the_kernel_cannot_take_gets_the_host_numbers(recorded):
    """A QKNorm call outside the fused route: a host patch reading q (0.29's attn1_patch), a pe of another
    length, grad-tracked inputs. Each gives exactly the host forward's and apply_rope's tensors."""
    dit = rm.load_reference("dit", "plain")
    dm = dit.model.diffusion_model
    name = qknorm_names(dm)[-1]
    module = dm.get_submodule(name)
    forward = deferred.DeferredQKForward(module)
    g = torch.Generator().manual_seed(3)
    b, h, length, d = 2, 6, 10, 32
    qkv = torch.randn(b, length, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    pe = dm.pe_embedder(torch.randn(b, length, 3, generator=g) * 4)
    host_q, host_k = type(module).forward(module, *qkv)
    host_rope = flux_math().apply_rope.__wrapped__ if hasattr(flux_math().apply_rope, "__wrapped__") \
        else flux_math().apply_rope

    with torch.no_grad():
        pq, pk = forward(*qkv)
        assert type(pq) is deferred.PendingQK
        # A patch doing arithmetic on q: computed once, exactly the host's tensor, and then used as such.
        torch.testing.assert_close(pq * 1.0, host_q, rtol=0, atol=0)
        out = flux_math().apply_rope(pq, pk, pe)            # pq is computed now: the host's apply_rope runs
        for got, ref in zip(out, host_rope(host_q, host_k, pe)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert recorded == []

        pq, pk = forward(*qkv)
        shorter = pe[:, :, :-1]                              # freqs for fewer tokens: not the kernel's case
        with pytest.raises(RuntimeError):
            host_rope(host_q, host_k, shorter)               # ... and the host raises on it too
        with pytest.raises(RuntimeError):
            flux_math().apply_rope(pq, pk, shorter)
        assert recorded == []

    # Grad-tracked input (QAT, training): the host's forward, real tensors.
    tracked = qkv.clone().requires_grad_(True)
    q, k = forward(*tracked)
    assert type(q) is torch.Tensor and q.requires_grad
    torch.testing.assert_close(q, host_q, rtol=0, atol=0)


def test_sd3_qk_norms_and_the_streams_cat_run_as_one_kernel(monkeypatch, tiny_sd35):
    from comfyui_octet.kernels.backends import triton_rope
    model = tiny_sd35()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    kw = {"c_crossattn": torch.randn(2, 5, 32, generator=g), "y": torch.randn(2, 32, generator=g)}
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        before = model.apply_model(x, sigma, **kw)
    assert before.isfinite().all()
    names = deferred.install_qk(model.diffusion_model)
    assert len(names) == 10 and all(n.endswith(("ln_q", "ln_k")) for n in names)   # 5 attentions: q and k
    calls = []
    real = triton_rope.rms_norm_heads
    monkeypatch.setattr(triton_rope, "rms_norm_heads", lambda segments, dtype, config=None:
                        calls.append(len(segments)) or real(segments, dtype, config))
    from comfyui_octet.kernels import dispatch
    with torch.no_grad():
        eager = model.apply_model(x, sigma, **kw)
        # An eager step keeps the host's norms: SD3.5's eager step is host-bound, the saving is GPU time.
        assert calls == [] and torch.equal(eager, before)
        with dispatch.graph_plans():        # as CUDA Graph Step's warm-up and capture calls run
            after = model.apply_model(x, sigma, **kw)
    # Every norm ran inside the kernel; the joint attentions' q and k as one launch over both streams' rows.
    assert sum(calls) == len(names) and calls.count(2) == 4 and calls.count(1) == 2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # Grad-tracked inputs (training) take the host's forward: real tensors.
    ln_q = model.diffusion_model.get_submodule(names[0])
    q = torch.randn(1, 3, 2, 64, requires_grad=True)
    with dispatch.graph_plans():
        out = ln_q(q)
    assert type(out) is torch.Tensor and out.requires_grad


def test_the_deferred_forwards_do_not_make_cuda_graph_step_fall_back():
    """CUDA Graph Step replays only object patches it knows are graph-safe; Octet's deferred forwards (q/k,
    GELU, LayerNorm) must be among them, or a quantized Flux would run eager through the node."""
    from comfyui_octet.nodes import graph_step
    dit = rm.load_reference("dit", "plain")
    q, _ = bridge.quantize_model(dit, DynamicW8A8Config(backend="triton"))
    kinds = {type(p).__name__ for p in q.object_patches.values()}
    assert {"DeferredQKForward", "DeferredGeluForward", "DeferredNormForward"} <= kinds
    assert all(graph_step._safe_object_patch(n, p) for n, p in q.object_patches.items())
    # ... while a foreign callable patch is still refused.
    assert not graph_step._safe_object_patch("diffusion_model.x.forward", lambda x: x)
