"""Presets select the intended layers on ComfyUI's real model classes of each family, built small."""
import pytest
import torch

import comfy.supported_models as sm
from comfyui_octet.nodes import host_compat, policy_nodes
from comfyui_octet.fixtures.reference_model import TINY_SD15_UNET
from comfyui_octet.octet import config_for_mode, quantize_
from comfyui_octet.octet.presets import FAMILIES, build_policy, family_for, preset

_UNET_COMMON = dict(TINY_SD15_UNET)
TINY = {
    "SD15": dict(TINY_SD15_UNET),
    "SDXL": {**_UNET_COMMON, "use_linear_in_transformer": True, "num_res_blocks": [1, 1, 1],
             "channel_mult": [1, 2, 2], "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
             "context_dim": 64, "adm_in_channels": 96, "num_classes": "sequential", "num_heads": -1,
             "num_head_channels": 16},
    "SD3": {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_patches": 64,
            "pos_embed_max_size": 8, "adm_in_channels": 64, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}}},
    "Flux": {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
             "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2,
             "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True},
    "WAN21_T2V": {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "freq_dim": 32,
                  "text_dim": 32, "in_dim": 16, "out_dim": 16, "num_heads": 4, "num_layers": 2},
}
MUST_KEEP = {  # named layers, so the predicates below cannot pass vacuously
    "SD15": ["time_embed.0", "input_blocks.0.0", "input_blocks.1.0.emb_layers.1", "out.2"],
    "SDXL": ["label_emb.0.0", "label_emb.0.2", "time_embed.2", "out.2"],
    "SD3": ["x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "joint_blocks.1.x_block.adaLN_modulation.1",
            "final_layer.linear"],
    "Flux": ["img_in", "txt_in", "guidance_in.in_layer", "double_blocks.0.img_mod.lin", "single_blocks.1.modulation.lin",
             "final_layer.adaLN_modulation.1"],
    "WAN21_T2V": ["text_embedding.0", "time_projection.1", "head.head"],
}
FAMILY = {"SD15": "SD15", "SDXL": "SDXL", "SD3": "SD3", "Flux": "Flux", "WAN21_T2V": "Wan"}


def _unet_keep(n, conservative):
    keep = n.startswith(("time_embed.", "label_emb.")) or ".emb_layers." in n or n in ("input_blocks.0.0", "out.2")
    extra = n.endswith((".attn2.to_k", ".attn2.to_v", ".ff.net.2"))
    return keep or (conservative and extra)


# The intended float layers, written independently of the preset tables (by what each layer *is*).
EXPECTED = {
    "SD15": _unet_keep,
    "SDXL": _unet_keep,
    "SD3": lambda n, c: (n.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "final_layer."))
                         or n == "context_embedder" or ".adaLN_modulation." in n
                         or (c and (n.endswith(".mlp.fc2") or n.endswith(".context_block.attn.qkv")))),
    "Flux": lambda n, c: (n in ("img_in", "txt_in") or n.startswith(("time_in.", "vector_in.", "guidance_in.",
                                                                      "final_layer."))
                          or n.endswith(("_mod.lin", ".modulation.lin"))
                          or (c and (n.endswith("_mlp.2") or n.endswith(".linear2")))),
    "WAN21_T2V": lambda n, c: (n.startswith(("text_embedding.", "time_embedding.", "time_projection.", "head."))
                               or (c and n.endswith((".cross_attn.k", ".cross_attn.v", ".ffn.2")))),
}


def init_weights(module, seed=0):
    """ComfyUI's ops leave weights uninitialised (torch.empty); give them fan-in scaled values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.numel():
                fan_in = p[0].numel() if p.dim() > 1 else 50
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


class _Patcher:
    """What the nodes read from a MODEL (patcher.model.model_config / diffusion_model)."""

    def __init__(self, model):
        self.model = model


def build(arch):
    config = getattr(sm, arch)(host_compat.unet_config_for_host(TINY[arch], arch))  # e.g. 0.29's txt_ids_dims
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    init_weights(model.diffusion_model)
    return model


@pytest.fixture(scope="module", params=list(TINY))
def family_model(request):
    return request.param, build(request.param)


@pytest.mark.parametrize("conservative", [False, True])
def test_preset_keeps_exactly_the_intended_layers(family_model, conservative):
    arch, model = family_model
    assert policy_nodes.detect_preset(_Patcher(model)) == FAMILY[arch]
    policy = preset(FAMILY[arch], conservative)
    result = quantize_(model.diffusion_model, config_for_mode("dynamic", backend="torch"), policy=policy,
                       inplace=False)
    kept = {r.name for r in result.skipped}
    expected = {r.name for r in result.layers if EXPECTED[arch](r.name, conservative)}
    assert kept == expected, f"{arch}: unexpected {sorted(kept - expected)}, missing {sorted(expected - kept)}"
    assert set(MUST_KEEP[arch]) <= kept
    assert 0 < len(kept) < len(result.layers)
    assert all(r.reason.startswith("preset") for r in result.skipped)


def test_generic_preset_finds_embeddings_and_ends_on_every_family(family_model):
    arch, model = family_model
    names = [r.name for r in quantize_(model.diffusion_model, config_for_mode("weight_only"), inplace=False).layers]
    generic = preset("generic")
    kept = {n for n in names if generic.action_for(n)[0] == "keep"}
    first, last = names[0], names[-1]
    # The first candidate is a timestep/patch embedding and the last is the output layer or its modulation.
    assert first in kept and last in kept, (arch, first, last)
    # ... and the bulk (attention / MLP / ResBlock convs) is still quantized.
    assert len(kept) < len(names) / 2


def test_every_host_model_class_maps_to_a_preset():
    mapped = {cls.__name__: family_for(c.__name__ for c in cls.__mro__) for cls in sm.models}
    assert mapped["SSD1B"] == "SDXL" and mapped["FluxSchnell"] == "Flux" and mapped["WAN22_T2V"] == "Wan"
    assert mapped["SD20"] == "SD15" and mapped["SD3"] == "SD3" and mapped["HunyuanVideo"] == "generic"
    assert set(FAMILIES) <= {cls.__name__ for cls in sm.models} | {"SD15", "SDXL"}  # no stale class names


def test_user_rules_beat_the_preset_on_a_real_model(family_model):
    arch, model = family_model
    policy = build_policy(FAMILY[arch], rules="re:.*: weight_only", overrides="")
    result = quantize_(model.diffusion_model, config_for_mode("dynamic"), policy=policy, inplace=False)
    assert not result.skipped and {r.decision for r in result.layers} == {"weight_only"}
