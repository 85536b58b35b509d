"""Outlier-stressed twins of the reference models: same float function, activation outliers.

Real large UNets and DiTs carry a few activation channels 10-100x larger than the rest at the
inputs of qkv / fc1 layers (the reason SmoothQuant exists); tiny trained models don't, so naive
INT8 looks too good on them. The twin rescales a few channels by s in [20, 60] where a per-channel
affine map feeds a linear consumer, and divides the consumer's matching input columns by s:

  * SD1.5 UNet: LayerNorm affine (norm1 -> to_q/to_k/to_v, norm2 -> attn2.to_q, norm3 -> GEGLU proj)
    and the SpatialTransformer GroupNorm affine -> proj_in (1x1 conv);
  * Flux DiT: adaLN modulation rows (shift and 1+scale) -> img/txt qkv and mlp[0], single-block linear1;
  * SD3 MMDiT: adaLN modulation rows of both streams (x_block = image, context_block = text) ->
    attn.qkv (shift_msa, scale_msa = chunks 0, 1) and mlp.fc1 (shift_mlp, scale_mlp = chunks 3, 4; not in the
    last block's "pre_only" context stream, which has no MLP).

For the adaLN case, ``(1 + scale) * n + shift`` becomes ``s(1 + scale) * n + s shift``: the rows of the
modulation Linear that make scale/shift are scaled by s, and (s - 1) is added to the scale bias.
Pure torch on ComfyUI's module tree; no ComfyUI import.
"""
from __future__ import annotations

import statistics

import torch

N_CHANNELS = 4
FACTOR_RANGE = (20.0, 60.0)


def _pick(dim: int, g: torch.Generator):
    idx = torch.randperm(dim, generator=g)[:N_CHANNELS]
    lo, hi = FACTOR_RANGE
    s = lo + (hi - lo) * torch.rand(N_CHANNELS, generator=g, dtype=torch.float64)
    return idx, s


@torch.no_grad()
def _divide_columns(consumer: torch.nn.Module, idx, s):
    w = consumer.weight  # Linear [out, in] or Conv [out, in, kh, kw]
    cols = w[:, idx].double() / s.view(1, -1, *([1] * (w.dim() - 2))).to(w.device)
    w[:, idx] = cols.to(w.dtype)


@torch.no_grad()
def _scale_affine(norm: torch.nn.Module, consumers, g):
    idx, s = _pick(norm.weight.shape[0], g)
    norm.weight[idx] = (norm.weight[idx].double() * s).to(norm.weight.dtype)
    norm.bias[idx] = (norm.bias[idx].double() * s).to(norm.bias.dtype)
    for c in consumers:
        _divide_columns(c, idx, s)
    return idx, s


@torch.no_grad()
def _scale_modulation(lin: torch.nn.Module, hidden: int, shift_chunk: int, scale_chunk: int, consumer, g):
    idx, s = _pick(hidden, g)
    for chunk, is_scale in ((shift_chunk, False), (scale_chunk, True)):
        rows = chunk * hidden + idx
        lin.weight[rows] = (lin.weight[rows].double() * s.view(-1, 1)).to(lin.weight.dtype)
        b = lin.bias[rows].double() * s + ((s - 1) if is_scale else 0)
        lin.bias[rows] = b.to(lin.bias.dtype)
    _divide_columns(consumer, idx, s)
    return idx, s


def make_twin(dm: torch.nn.Module, kind: str, seed: int = 0) -> list[dict]:
    """Rescale ``dm`` (in place) into its outlier-stressed twin; returns one record per rescaled site."""
    g = torch.Generator().manual_seed(seed)
    sites = []

    def record(name, consumers, idx, s):
        sites.append({"site": name, "consumers": consumers, "channels": idx.tolist(),
                      "factors": [round(float(x), 2) for x in s]})

    for name, m in dm.named_modules():
        t = type(m).__name__
        if kind == "unet" and t == "SpatialTransformer":
            record(f"{name}.norm", [f"{name}.proj_in"], *_scale_affine(m.norm, [m.proj_in], g))
        elif kind == "unet" and t == "BasicTransformerBlock":
            plan = [("norm1", ["attn1.to_q", "attn1.to_k", "attn1.to_v"]), ("norm2", ["attn2.to_q"]),
                    ("norm3", ["ff.net.0.proj"])]
            for norm, cons in plan:
                mods = [m.get_submodule(c) for c in cons]
                record(f"{name}.{norm}", [f"{name}.{c}" for c in cons], *_scale_affine(getattr(m, norm), mods, g))
        elif kind == "dit" and t == "DoubleStreamBlock":
            h = m.hidden_size
            for stream in ("img", "txt"):
                lin = getattr(m, f"{stream}_mod").lin
                for shift, scale, cons in ((0, 1, f"{stream}_attn.qkv"), (3, 4, f"{stream}_mlp.0")):
                    record(f"{name}.{stream}_mod.lin[{shift},{scale}]", [f"{name}.{cons}"],
                           *_scale_modulation(lin, h, shift, scale, m.get_submodule(cons), g))
        elif kind == "dit" and t == "SingleStreamBlock":
            record(f"{name}.modulation.lin[0,1]", [f"{name}.linear1"],
                   *_scale_modulation(m.modulation.lin, m.hidden_size, 0, 1, m.linear1, g))
        elif kind == "mmdit" and t == "DismantledBlock":
            lin, h = m.adaLN_modulation[1], m.attn.qkv.in_features
            plan = [(0, 1, "attn.qkv")] + ([] if m.pre_only else [(3, 4, "mlp.fc1")])
            for shift, scale, cons in plan:
                record(f"{name}.adaLN_modulation.1[{shift},{scale}]", [f"{name}.{cons}"],
                       *_scale_modulation(lin, h, shift, scale, m.get_submodule(cons), g))
    if not sites:
        raise ValueError(f"make_twin found no site to rescale in a {kind!r} model: is it an Octet reference model?")
    return sites


@torch.no_grad()
def channel_outlier_ratios(dm: torch.nn.Module, run) -> dict[str, float]:
    """Per Linear/Conv2d layer: max / median of the per-input-channel absmax of its activations,
    over whatever ``run()`` (one or more forward passes of ``dm``) feeds it."""
    absmax, hooks = {}, []

    def hook(name, channel_dim):
        def fn(mod, args):
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != (channel_dim % x.dim())]
            a = x.abs().amax(dim=dims)
            absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
        return fn

    for name, m in dm.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook(name, -1)))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(hook(name, 1)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {k: float(v.max() / v.median().clamp_min(1e-12)) for k, v in absmax.items() if v.numel() > 1}


def summarize_ratios(plain: dict[str, float], twin: dict[str, float], consumers: list[str]) -> dict:
    """Median over all layers and over the twin's consumer layers of the max/median ratio, plain vs twin."""
    cons = [c for c in consumers if c in plain and c in twin]
    return {
        "layers": len(plain),
        "median_ratio_all_plain": statistics.median(plain.values()),
        "median_ratio_all_twin": statistics.median(twin.values()),
        "median_ratio_consumers_plain": statistics.median(plain[c] for c in cons) if cons else None,
        "median_ratio_consumers_twin": statistics.median(twin[c] for c in cons) if cons else None,
        "max_ratio_twin": max(twin.values()),
    }
