"""The embedded default model: a small SD1.5-architecture UNet built with ComfyUI's own classes.

It is ComfyUI's real ``SD15`` model class (UNetModel with ResBlocks, SpatialTransformers and
cross-attention) with a shrunken config, so every host code path (ModelPatcher, KSampler,
model_sampling) is exercised, yet it samples in well under a second on a CPU. Its weights are
drawn from a fixed seed (ComfyUI's ops skip initialisation, so we init them ourselves): the demo,
the tests and the example workflows see the same model everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

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


# ---------------------------------------------------------------------------------------------
# Trained reference models (issue 9): class-conditional Fashion-MNIST models of two real ComfyUI
# families, built with ComfyUI's own classes. This part imports nothing but torch at module level
# and uses no relative imports, so models/train_reference.py can load this file on its own on a
# machine that has ComfyUI's `comfy` package but not the rest of the host.
# ---------------------------------------------------------------------------------------------
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
NULL_CLASS = len(CLASSES)  # index of the learned "unconditional" embedding (classifier-free guidance)
COND_TOKENS, COND_DIM = 4, 64
IMAGE_SIZE = 32  # 28x28 Fashion-MNIST padded to 32x32 so it unshuffles evenly

# SD1.5 family: openaimodel UNet with ResBlocks + SpatialTransformers (cross-attention on the
# class tokens), eps prediction with SD1.5's discrete schedule. Latent 4x16x16.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "context_dim": COND_DIM, "num_heads": 4, "num_head_channels": -1,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Flux family: double + single stream blocks, adaLN modulation, RoPE, flow matching with Flux's
# shifted schedule. Latent 16x8x8 (4x4 pixel-unshuffle), Flux patchifies 2x2 -> 16 image tokens.
DIT_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": COND_DIM,
    "context_in_dim": COND_DIM, "hidden_size": 192, "mlp_ratio": 4.0, "num_heads": 6, "depth": 2,
    "depth_single_blocks": 4, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
    "guidance_embed": False,
}
# SD3 family (issue 15): ComfyUI's MMDiT (joint text/image attention: each block has an image stream and a
# context stream with their own adaLN modulation, qkv, proj and MLP, attending jointly; the last block is
# "pre_only" on the context side), rectified flow with SD3's discrete-flow schedule (shift 3.0). MMDiT fixes
# hidden = 64 * depth and heads = depth, so depth 1 -> hidden 64, one head of 64; num_blocks 4 decouples the
# block count (it was trained on a shared 2-core CPU in minutes, hence this small). Latent 16x8x8 as for Flux (4x4 pixel-unshuffle), patch 2 -> 16 image tokens + 4 context tokens;
# the pooled class vector is SD3's `y` (adm). No pos_embed buffer: sin-cos position embedding computed per call.
MMDIT_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "num_blocks": 4, "mlp_ratio": 4.0,
    "input_size": None, "adm_in_channels": COND_DIM, "qkv_bias": True, "pos_embed_max_size": None,
    "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": COND_DIM, "out_features": 64}},
}


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    kind: str            # "unet" | "dit" | "mmdit"
    architecture: str    # name in comfy.supported_models
    unet_config: dict
    unshuffle: int       # pixel-unshuffle factor image -> latent
    latent_channels: int
    filename: str

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // self.unshuffle

    @property
    def path(self) -> str:
        return os.path.join(MODELS_DIR, self.filename)


SPECS = {
    "unet": ReferenceSpec("unet", "SD15", UNET_CONFIG, 2, 4, "octet_fmnist_unet.safetensors"),
    "dit": ReferenceSpec("dit", "Flux", DIT_CONFIG, 4, 16, "octet_fmnist_dit.safetensors"),
    "mmdit": ReferenceSpec("mmdit", "SD3", MMDIT_CONFIG, 4, 16, "octet_fmnist_mmdit.safetensors"),
}
FLOW_KINDS = ("dit", "mmdit")  # rectified-flow models (CONST): sigma in [0, 1], target v = noise - x0
VARIANTS = ("plain", "twin")
CLASS_KEYS = ("octet.class_context", "octet.class_pooled")  # extra tensors in the shipped file


def spec(kind: str) -> ReferenceSpec:
    if kind not in SPECS:
        raise ValueError(f"Unknown reference model {kind!r}; choose one of {list(SPECS)}.")
    return SPECS[kind]


def build_diffusion_model(kind: str, device=None, dtype=torch.float32) -> torch.nn.Module:
    """The bare diffusion network (ComfyUI's class, ComfyUI's ops), default-initialised: for training.

    Same module tree and state-dict keys as ``supported_models.<arch>.get_model().diffusion_model``.
    """
    import comfy.ops
    s = spec(kind)
    cfg = dict(s.unet_config)
    if kind == "unet":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel as cls
    elif kind == "dit":
        from comfy.ldm.flux.model import Flux as cls
    else:
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper as cls
    net = cls(**cfg, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    # ComfyUI's ops skip parameter init (weights normally come from a checkpoint, tensors are
    # torch.empty): run torch's own init, and set Flux's RMSNorm `scale` (QK-norm) to one.
    torch_init = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    covered = set()
    for m in net.modules():
        base = next((b for b in torch_init if isinstance(m, b)), None)
        if base is not None:
            base.reset_parameters(m)
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if id(p) in covered:
                continue
            if name.endswith(".scale"):
                p.fill_(1.0)
            else:
                raise RuntimeError(f"build_diffusion_model: no init rule for parameter {name}")
    return net


def model_sampling(kind: str):
    """The host's model_sampling object for this model (what KSampler uses), built from comfy.model_sampling
    alone. tests/nodes checks it equals the one the loaded ModelPatcher carries."""
    import comfy.model_sampling as ms
    if kind == "unet":
        class Sampling(ms.ModelSamplingDiscrete, ms.EPS):
            pass
        return Sampling(None)
    if kind == "mmdit":
        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass
        return Sampling(type("Cfg", (), {"sampling_settings": {"shift": 3.0}})())  # comfy.supported_models.SD3
    cfg = type("Cfg", (), {"sampling_settings": {"shift": 1.15}})()  # comfy.supported_models.Flux default

    class Sampling(ms.ModelSamplingFlux, ms.CONST):
        pass
    return Sampling(cfg)


def images_to_latents(kind: str, images: torch.Tensor) -> torch.Tensor:
    """[B,1,32,32] in [-1,1] -> latents in model space (pixel-unshuffle, lossless)."""
    return torch.nn.functional.pixel_unshuffle(images, spec(kind).unshuffle)


def latents_to_images(kind: str, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> [B,1,32,32] in [-1,1] (pixel-shuffle), clamped."""
    return torch.nn.functional.pixel_shuffle(latents.float(), spec(kind).unshuffle).clamp(-1, 1)


def decode(patcher, latents: torch.Tensor) -> torch.Tensor:
    """KSampler output (a LATENT's samples, in the host's latent space) -> images [B,1,32,32] in [0,1].

    KSampler returns ``latent_format.process_out(x)``; our models were trained on ``process_in`` space.
    """
    kind = patcher.model_options.get("octet_reference", {}).get("kind")
    if kind is None:
        raise ValueError("decode() needs a MODEL from load_reference() (an Octet reference model).")
    x = patcher.model.latent_format.process_in(latents.float())
    return (latents_to_images(kind, x) + 1) / 2


def empty_latent(kind: str, batch: int = 1) -> dict:
    s = spec(kind)
    return {"samples": torch.zeros(batch, s.latent_channels, s.latent_size, s.latent_size)}


def read_file(path: str):
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta.get("octet_reference", "{}"))
    return tensors, info


def load_reference(kind: str = "unet", variant: str = "plain", path: str | None = None,
                   dtype: torch.dtype = torch.float32):
    """A ModelPatcher of a shipped reference model (or its outlier-stressed twin), via the host's model classes.

    The twin is made at load time by a function-preserving rescale (see reference_twin.py): same float
    function, activation outliers at the inputs of qkv / fc1 layers.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    s = spec(kind)
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; choose one of {list(VARIANTS)}.")
    path = path or s.path
    if not os.path.exists(path):
        raise FileNotFoundError(f"Reference model weights not found at {path}. They ship in the repo's models/ "
                                f"folder; re-create them with `python models/train_reference.py`.")
    tensors, info = read_file(path)
    from .host_compat import unet_config_for_host  # package-relative: load_reference runs inside the pack only
    config = getattr(comfy.supported_models, s.architecture)(unet_config_for_host(s.unet_config, f"reference {kind}"))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "")
    # The host's own file-key mapping (0.29 reads Flux's QK-norm `.scale` as `.weight`).
    sd = config.process_unet_state_dict({k: v.to(dtype) for k, v in tensors.items() if not k.startswith("octet.")})
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the {kind} reference architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    model.diffusion_model.to(dtype)
    twin_report = None
    if variant == "twin":
        from .reference_twin import make_twin
        twin_report = make_twin(model.diffusion_model, kind)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    source_dtype = next((str(v.dtype).replace("torch.", "") for k, v in tensors.items()
                         if v.is_floating_point() and not k.startswith("octet.")), None)
    patcher.model_options["octet_reference"] = {"kind": kind, "variant": variant, "path": path,
                                                "info": info, "twin": twin_report, "source_dtype": source_dtype}
    return patcher


def class_conditioning(kind: str, label: int | str, batch: int = 1, path: str | None = None):
    """CONDITIONING for a class (index or name; "unconditional" or NULL_CLASS for the CFG negative)."""
    if isinstance(label, str):
        label = NULL_CLASS if label == "unconditional" else CLASSES.index(label)
    if not 0 <= int(label) <= NULL_CLASS:
        raise ValueError(f"class {label} out of range 0..{NULL_CLASS} ({NULL_CLASS} = unconditional).")
    tensors, _ = read_file(path or spec(kind).path)
    ctx = tensors[CLASS_KEYS[0]][int(label)].float()
    pooled = tensors[CLASS_KEYS[1]][int(label)].float()
    return [[ctx[None].repeat(batch, 1, 1), {"pooled_output": pooled[None].repeat(batch, 1)}]]


def batch_conditioning(kind: str, labels, path: str | None = None):
    """One CONDITIONING whose batch carries a different class per sample (for class grids)."""
    tensors, _ = read_file(path or spec(kind).path)
    idx = torch.as_tensor(list(labels), dtype=torch.long)
    return [[tensors[CLASS_KEYS[0]][idx].float(), {"pooled_output": tensors[CLASS_KEYS[1]][idx].float()}]]
