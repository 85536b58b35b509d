"""Tests under tests/nodes run against the real ComfyUI (found by nodes/host.py)."""
import pytest
import torch

from comfyui_octet.nodes import host

host.ensure_comfy(cpu=True)


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded reference model (ComfyUI's SD15 class, shrunken); shared, never mutated by tests."""
    from comfyui_octet.fixtures import reference_model
    return reference_model.build_tiny_sd15()


@pytest.fixture
def sample():
    """Sample through the host's real KSampler path (nodes.common_ksampler); returns the latent."""
    import nodes
    from comfyui_octet.fixtures import reference_model

    def run(model, seed=42, steps=6, cfg=4.0, sampler="euler", scheduler="normal", size=16, batch=1):
        latent = {"samples": torch.zeros(batch, 4, size, size)}
        pos = reference_model.tiny_conditioning(batch=1, seed=1)
        neg = reference_model.tiny_conditioning(batch=1, seed=2)
        return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]["samples"]
    return run


@pytest.fixture
def sample_dit():
    """Sample the Flux-class reference DiT through the host's KSampler: one image (class 3), CFG 3.0 against
    the unconditional class (one batched model call per step), euler; returns the latent. One image, not
    more: these tests run Triton kernels in the CPU interpreter, whose time grows with the batch."""
    import nodes
    from comfyui_octet.fixtures import reference_model as rm

    def run(patcher, steps, seed=5):
        pos = rm.batch_conditioning("dit", [3])
        neg = rm.class_conditioning("dit", "unconditional", batch=1)
        return nodes.common_ksampler(patcher, seed, steps, 3.0, "euler", "normal", pos, neg,
                                     rm.empty_latent("dit", 1))[0]["samples"]
    return run


def _build_tiny_sd35():
    """The host's SD3 class with SD3.5-medium's attention (qk_norm "rms", an x_block_self_attn block), shrunk:
    2 blocks of 2 heads of 64, random fp32 weights."""
    import comfy.supported_models
    unet = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
            "adm_in_channels": 32, "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms",
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}
    config = comfy.supported_models.SD3(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # buffers too: the position embedding is allocated uninitialised
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() < 2 else p[0].numel() ** -0.5))
    return model.eval()


@pytest.fixture
def tiny_sd35():
    """A builder of fresh tiny SD3.5 models (tests patch them in place)."""
    return _build_tiny_sd35
