"""The embedded default model: a small SD1.5-architecture UNet built with ComfyUI's own classes.

It is ComfyUI's real ``SD15`` model class (UNetModel with ResBlocks, SpatialTransformers and
cross-attention) with a shrunken config, so every host code path (ModelPatcher, KSampler,
model_sampling) is exercised, yet it samples in well under a second on a CPU. Its weights are
drawn from a fixed seed (ComfyUI's ops skip initialisation, so we init them ourselves): the demo,
the tests and the example workflows see the same model everywhere.
"""
from __future__ import annotations

import math

import torch

TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 4, "num_head_channels": -1,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONTEXT_DIM = TINY_SD15_UNET["context_dim"]
DEFAULT_SEED = 20261126
OUTPUT_DAMPING = 0.05


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        with torch.no_grad():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.dim() == 1:  # norm affine weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.05)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def build_tiny_sd15(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around ComfyUI's SD15 model class with the tiny config above."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "")
    _init_weights(model.diffusion_model, seed)
    with torch.no_grad():
        # A random UNet predicts noise far larger than unit scale, and sampling then diverges;
        # damping the last conv keeps the predicted noise near unit scale, like a trained model.
        model.diffusion_model.out[-1].weight.mul_(OUTPUT_DAMPING)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_conditioning(batch: int = 1, tokens: int = 8, seed: int = 0):
    """ComfyUI CONDITIONING for the tiny model: [[cross_attn_tensor, {}]]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=g), {}]]
