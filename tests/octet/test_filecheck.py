"""octet/filecheck.py as pure functions: real architectures pass, forged sizes and damaged records do not."""
import pytest
import torch

from comfyui_octet.octet import filecheck
from comfyui_octet.octet.api import OctetError

# unet_configs as ComfyUI's model detection builds them, with a few of each model's real tensor shapes.
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False}


def _shapes(n, *dims):
    return {f"t{i}": dims[i % len(dims)] for i in range(n)}


@pytest.mark.parametrize("config, shapes", [
    (FLUX_DEV, _shapes(780, (3072, 64), (9216, 3072), (3072, 4096), (12288, 3072), (3072, 768), (3072,))),
    (SDXL, _shapes(1680, (320, 4, 3, 3), (1280, 2816), (640, 2048), (10240, 1280), (1280,))),
])
def test_real_architectures_pass(config, shapes):
    filecheck.check_architecture("m.safetensors", config, shapes)


@pytest.mark.parametrize("change, match", [
    ({"depth": 8000}, "claims 8000 blocks"),
    ({"num_res_blocks": [3000, 3000, 3000]}, "claims 9000 blocks"),
    ({"hidden_size": 3072 * 1000}, "larger than any tensor"),
    ({"hidden_size": -3072}, "negative"),
    ({"hidden_size": "3072"}, None),          # strings are left to the host's constructors (guarded_build)
    ({"num_heads": float("nan")}, "not a number"),
])
def test_forged_sizes_are_refused(change, match):
    shapes = _shapes(780, (3072, 64), (9216, 3072), (3072, 4096), (12288, 3072))
    if match is None:
        filecheck.check_architecture("m.safetensors", {**FLUX_DEV, **change}, shapes)
        return
    with pytest.raises(OctetError, match=match):
        filecheck.check_architecture("m.safetensors", {**FLUX_DEV, **change}, shapes)


def test_content_hash_sees_every_bit_and_nothing_else(rng):
    tensors = {"b": torch.randn(5, 7, generator=rng), "a": torch.randint(-128, 127, (64,), generator=rng,
                                                                        dtype=torch.int8)}
    h = filecheck.content_hash(tensors)
    assert h.startswith(filecheck.HASH_ALGO + ":")
    assert filecheck.content_hash(dict(reversed(list(tensors.items())))) == h      # key order is irrelevant
    flipped = {**tensors, "a": tensors["a"].clone()}
    flipped["a"][13] ^= 4
    assert filecheck.content_hash(flipped) != h
    assert filecheck.content_hash({**tensors, "b": tensors["b"].reshape(7, 5)}) != h  # shape is hashed
    assert filecheck.content_hash({"c": tensors["b"], "a": tensors["a"]}) != h          # names are hashed


def test_timestep_groups_record():
    assert filecheck.check_timestep_groups("f", {"boundaries": [0.5, 2.0]}) == 3
    for bad in ({"boundaries": ["1"]}, {"boundaries": [2.0, 1.0]}, [1.0], {"boundaries": [float("inf")]},
                {"boundaries": list(range(5000))}, None):
        with pytest.raises(OctetError, match="timestep_groups"):
            filecheck.check_timestep_groups("f", bad)


def test_save_refuses_non_finite_tensors_by_name():
    with pytest.raises(OctetError, match="'blocks.3.weight_scale' holds 2 NaN/inf"):
        filecheck.check_finite_for_save({"blocks.3.weight_scale": torch.tensor([1.0, float("nan"), float("inf")]),
                                         "ok": torch.ones(2)}, "'m.safetensors'")
    filecheck.check_finite_for_save({"w": torch.ones(3, dtype=torch.int8), "s": torch.ones(3)}, "x")
