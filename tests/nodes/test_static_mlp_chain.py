"""Static MLP chains on the real host: the Flux-class reference DiT through Quantize Model, KSampler,
Save/Load. The chain is an object patch on each MLP's forward; the source MODEL must not change."""
import pytest
import torch

from comfyui_octet.nodes import bridge, calibrate_nodes, model_files
from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.octet import StaticW8A8Config, fusion

SETTINGS = {"observer": "mse", "percentile": 99.99, "timestep_groups": True, "smooth_alpha": 0.5}
STEPS = 4


@pytest.fixture(scope="module")
def dit():
    return rm.load_reference("dit", "plain")


@pytest.fixture(scope="module")
def static_dit(dit):
    pos = rm.batch_conditioning("dit", [1, 6])
    neg = rm.class_conditioning("dit", "unconditional", batch=2)
    cal, _ = calibrate_nodes.calibrate(dit, pos, neg, rm.empty_latent("dit", 2), 11, STEPS, 3.0, "euler", "normal", 3)
    q, result = bridge.quantize_model(dit, StaticW8A8Config(**SETTINGS), calibration=cal)
    return q, result


def test_chains_are_object_patches_and_sample_like_the_layers(dit, static_dit, monkeypatch, sample_dit):
    q, result = static_dit
    dm = dit.model.diffusion_model
    mlps = sorted(n for n, m in dm.named_modules() if n.endswith(("img_mlp", "txt_mlp")))
    assert mlps and result.chains == mlps
    assert all(f"diffusion_model.{n}.forward" in q.object_patches for n in mlps)
    chained = sample_dit(q, STEPS)
    monkeypatch.setenv("OCTET_FUSED_MLP", "0")
    layered = sample_dit(q, STEPS)
    # fp32 on CPU: the chain's reference computes exactly what the two layers and the GELU compute.
    assert torch.equal(chained, layered)


def test_source_model_keeps_its_own_forward(dit, static_dit, sample_dit):
    q, _ = static_dit
    before = sample_dit(dit, STEPS, seed=9)
    sample_dit(q, STEPS)
    after = sample_dit(dit, STEPS, seed=9)
    assert torch.equal(before, after)
    for name, m in dit.model.diffusion_model.named_modules():
        if name.endswith("img_mlp"):
            f = vars(m).get("forward")
            # ModelPatcher restores by setattr, leaving the class's own forward bound to the module.
            assert f is None or f.__func__ is type(m).forward


def test_saved_static_dit_reloads_with_chains(static_dit, tmp_path, sample_dit):
    q, _ = static_dit
    path = str(tmp_path / "dit_static.safetensors")
    model_files.save_model(q, path)
    loaded = model_files.load_model(path)
    dm = loaded.model.diffusion_model
    assert all(vars(m)["forward"].__func__ is fusion._chain_forward
               for n, m in dm.named_modules() if n.endswith(("img_mlp", "txt_mlp")))
    assert torch.equal(sample_dit(loaded, STEPS), sample_dit(q, STEPS))
