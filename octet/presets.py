"""Policy presets per model family: the layers the literature and the peers keep in float.

Presets hold what the literature and the peers agree on (Q-Diffusion, PTQ4DM, PTQD, SVDQuant,
ViDiT-Q, INT8-Fast, torchao's diffusion recipes): the timestep and text/ADM embeddings, adaLN /
modulation layers, the first and last layer, and norms stay in float. Those layers carry a
handful of parameters, see one token per sample (so INT8 buys no speed there) and feed every
block, so their error is amplified downstream. ``conservative`` additionally keeps layers that
see outlier-heavy activations: cross-attention k/v (text encoder outputs) and FFN
down-projections (post-GELU/GEGLU activations are heavy-tailed).

Presets put their rules *after* the user's (``build_policy``), so a user rule always beats a preset
rule for the same layer. No ComfyUI import: the architecture arrives as the model-config class
names (MRO order).
"""
from __future__ import annotations

from typing import Iterable, Optional

from .api import OctetError
from .policy import DEFAULT, KEEP, Policy, Rule, parse_overrides, parse_rules


def _keep(patterns: str, why: str) -> list[tuple[str, str]]:
    return [(p, why) for p in patterns.split()]


# Norm layers are never Linear/Conv2d in these models, so they are never candidates; the generic
# '*norm*' rule is there for architectures that implement a norm's projection as a Linear.
_UNET = (_keep("time_embed", "timestep embedding MLP")
         + _keep("*.emb_layers", "per-ResBlock timestep projection (one vector per sample: no INT8 speedup)")
         + _keep("input_blocks.0.0", "first layer (conv_in)")
         + _keep("out.2", "last layer (conv_out)"))
_UNET_CONSERVATIVE = (_keep("*.attn2.to_k *.attn2.to_v", "cross-attention k/v on text-encoder outputs (outliers)")
                      + _keep("*.ff.net.2", "FFN down-projection (heavy-tailed GEGLU activations)"))

PRESETS: dict[str, dict] = {
    "SD15": {"keep": _UNET, "conservative": _UNET_CONSERVATIVE,
             "about": "SD1.x/2.x UNet (also SVD, Zero123, x4 upscaler)"},
    "SDXL": {"keep": _keep("label_emb", "ADM embedding (pooled text + size/crop)") + _UNET,
             "conservative": _UNET_CONSERVATIVE, "about": "SDXL / SDXL refiner / SSD-1B / Vega / KOALA UNet"},
    "SD3": {"keep": (_keep("x_embedder", "first layer (patch embedding)")
                     + _keep("t_embedder", "timestep embedding MLP")
                     + _keep("y_embedder", "pooled text embedding MLP")
                     + _keep("context_embedder", "text-encoder input projection (T5 outliers)")
                     + _keep("*.adaLN_modulation", "adaLN modulation (scales every block)")
                     + _keep("final_layer", "last layer")),
            "conservative": (_keep("*.mlp.fc2", "FFN down-projection")
                             + _keep("*.context_block.attn.qkv", "text-stream qkv (T5 outliers)")),
            "about": "SD3 / SD3.5 MMDiT"},
    "Flux": {"keep": (_keep("img_in", "first layer (image tokens in)")
                      + _keep("txt_in", "text-encoder input projection (T5 outliers)")
                      + _keep("time_in guidance_in", "timestep / guidance embedding MLP")
                      + _keep("vector_in", "pooled CLIP embedding MLP")
                      + _keep("*_mod *.modulation *modulation*", "adaLN modulation (scales every block)")
                      + _keep("final_layer", "last layer")),
             "conservative": (_keep("*_mlp.2", "FFN down-projection")
                              + _keep("single_blocks.*.linear2", "single-block output (attn + MLP down-projection)")),
             "about": "Flux.1 dev/schnell/fill, Flux.2"},
    "Wan": {"keep": (_keep("patch_embedding", "first layer (patch embedding)")
                     + _keep("text_embedding", "text-encoder input projection (umT5 outliers)")
                     + _keep("time_embedding time_projection", "timestep embedding and modulation")
                     + _keep("img_emb", "CLIP image embedding (i2v)")
                     + _keep("*.modulation", "modulation")
                     + _keep("head", "last layer")),
            "conservative": (_keep("*.cross_attn.k *.cross_attn.v *.cross_attn.k_img *.cross_attn.v_img",
                                   "cross-attention k/v on text/image-encoder outputs")
                             + _keep("*.ffn.2", "FFN down-projection")),
            "about": "Wan 2.1 / 2.2 (t2v, i2v, vace, camera, ...)"},
    "generic": {"keep": (_keep("*time*embed* *timestep* *t_embedder* *time_in *time_proj*", "timestep embedding")
                         + _keep("*label_emb* *y_embedder* *vector_in *guidance_in *text_embed* *context_embedder "
                                 "*caption_projection* *txt_in", "text / ADM / guidance embedding")
                         + _keep("*adaLN* *modulation* *_mod *_mod.*", "adaLN / modulation")
                         + _keep("*norm*", "normalisation")
                         + _keep("x_embedder *patch_embed* img_in conv_in input_blocks.0.0", "first layer")
                         + _keep("final_layer* proj_out conv_out head out.2 norm_out", "last layer")),
                "conservative": _keep("*.ff.net.2 *.mlp.fc2 *.ffn.2 *_mlp.2", "FFN down-projection"),
                "about": "any other architecture: name heuristics for embeddings, modulation, first/last layers"},
}
PRESET_NAMES = tuple(PRESETS)

# ComfyUI model-config class names (comfy/supported_models.py) -> preset. Subclasses are found
# through the MRO the caller passes (SSD1B -> SDXL, FluxSchnell -> Flux, WAN22_T2V -> WAN21_T2V).
FAMILIES = {
    "SD15": "SD15", "SD20": "SD15", "SD15_instructpix2pix": "SD15", "SVD_img2vid": "SD15",
    "Stable_Zero123": "SD15", "SD_X4Upscaler": "SD15", "LotusD": "SD15",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL", "SDXL_instructpix2pix": "SDXL",
    "SD3": "SD3",
    "Flux": "Flux", "FluxSchnell": "Flux", "FluxInpaint": "Flux", "Flux2": "Flux",
    "WAN21_T2V": "Wan",
}


def family_for(class_names: Iterable[str]) -> str:
    """Preset for a model-config class given as its MRO names (most derived first); 'generic' if unknown."""
    for n in class_names:
        if n in FAMILIES:
            return FAMILIES[n]
    return "generic"


def preset(family: str, conservative: bool = False) -> Policy:
    if family not in PRESETS:
        raise OctetError(f"Unknown preset {family!r}; choose one of {list(PRESET_NAMES)}.")
    spec = PRESETS[family]
    pairs = spec["keep"] + (spec["conservative"] if conservative else [])
    src = f"preset {family}" + (" conservative" if conservative else "")
    name = f"preset:{family}" + ("+conservative" if conservative else "")
    return Policy(name=name, rules=[Rule(p, KEEP, why=why, source=src) for p, why in pairs])


def build_policy(preset_name: Optional[str] = None, *, conservative: bool = False, rules: str = "",
                 overrides: str = "", default_action: str = DEFAULT, name: Optional[str] = None) -> Policy:
    """The Mixed-Precision Policy node's logic: user rules, then the preset's, then the default."""
    user = Policy(name="rules", rules=parse_rules(rules), overrides=parse_overrides(overrides),
                  default_action=default_action)
    parts = []
    if preset_name:
        base = preset(preset_name, conservative)
        policy = user.merged(base)
        parts.append(base.name)
    else:
        policy = user
    if user.rules:
        parts.append(f"{len(user.rules)} rules")
    if user.overrides:
        parts.append(f"{len(user.overrides)} overrides")
    if policy.default_action != DEFAULT:
        parts.append(f"default {policy.default_action}")
    policy.name = name or ("+".join(parts) if parts else "default")
    return policy
