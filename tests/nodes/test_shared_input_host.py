"""The host's own attention blocks with their q/k/v projections fused (octet/shared_input.py): ComfyUI's
SpatialTransformer (SD1.x/SDXL: self-attention q/k/v, cross-attention k/v on the text context) and Wan's
self- and cross-attention (q, k, v of one width, k/v on the context) give the numbers of the layers' own plans
through the host's attention code, which receives column blocks of one GEMM output (views, not copies)."""
import torch

from comfyui_octet import octet


def _own_plans(model, run):
    """``run()`` with every layer of ``model`` on its own plan (groups detached for the call)."""
    members = [m for m in model.modules() if getattr(m, "fused_group", None) is not None]
    groups = [m.fused_group for m in members]
    try:
        for m in members:
            m.fused_group = None
        return run()
    finally:
        for m, g in zip(members, groups):
            m.fused_group = g


def _randomized(module, scale=0.2):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


def test_spatial_transformer_attention_projections_fuse_and_keep_their_numbers():
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    st = _randomized(SpatialTransformer(64, 2, 32, depth=2, context_dim=24, use_linear=True,
                                        operations=comfy.ops.disable_weight_init))
    result = octet.quantize_(st, octet.DynamicW8A8Config())
    blocks = [f"transformer_blocks.{i}" for i in range(2)]
    assert result.fused_groups == [g for b in blocks for g in
                                   ([f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"],
                                    [f"{b}.attn2.to_k", f"{b}.attn2.to_v"])]
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 64, 4, 6, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        want = _own_plans(st, lambda: st(x, context=[ctx, ctx]))
        for _ in range(2):
            assert torch.equal(st(x, context=[ctx, ctx]), want)
    for b in blocks:
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"):
            st.get_submodule(f"{b}.{name}")._plans = {}
    with torch.no_grad():
        st(x, context=[ctx, ctx])
    assert all(st.get_submodule(f"{b}.{n}")._plans == {} for b in blocks
               for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"))


def test_wan_attentions_fuse_self_attention_and_learn_that_cross_attention_q_reads_another_input():
    import comfy.ops
    from comfy.ldm.flux.math import rope
    from comfy.ldm.wan.model import WanSelfAttention, WanT2VCrossAttention
    settings = {"operations": comfy.ops.disable_weight_init}
    block = torch.nn.ModuleDict({"self_attn": WanSelfAttention(64, 2, operation_settings=settings),
                                 "cross_attn": WanT2VCrossAttention(64, 2, operation_settings=settings)})
    _randomized(block)
    result = octet.quantize_(block, octet.DynamicW8A8Config())
    assert result.fused_groups == [["self_attn.q", "self_attn.k", "self_attn.v"],
                                   ["cross_attn.q", "cross_attn.k", "cross_attn.v"]]
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 6, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    freqs = rope(torch.arange(6, dtype=torch.float32).reshape(1, 6), 32, 10000).unsqueeze(2)   # [1, s, 1, d/2, 2, 2]

    def run():
        h = block["self_attn"](x, freqs)
        return block["cross_attn"](h, ctx)
    with torch.no_grad():
        want = _own_plans(block, run)
        for _ in range(3):
            assert torch.equal(run(), want)
    assert block["cross_attn"].q.fused_group is None
    assert block["cross_attn"].k.fused_group is block["cross_attn"].v.fused_group is not None
