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
    """Sample the Flux-class reference DiT through the host's KSampler: two images (classes 3 and 8),
    CFG 3.0 against the unconditional class, euler; returns the latent."""
    import nodes
    from comfyui_octet.fixtures import reference_model as rm

    def run(patcher, steps, seed=5):
        pos = rm.batch_conditioning("dit", [3, 8])
        neg = rm.class_conditioning("dit", "unconditional", batch=2)
        return nodes.common_ksampler(patcher, seed, steps, 3.0, "euler", "normal", pos, neg,
                                     rm.empty_latent("dit", 2))[0]["samples"]
    return run
