"""Write the cross-host checkpoint fixtures of the running ComfyUI (run once per supported host).

    .venv/bin/python tests/nodes/host_fixtures/make_fixtures.py                      # ComfyUI 0.3.75
    COMFYUI_PATH=.hosts/comfy029 .venv029/bin/python tests/nodes/host_fixtures/make_fixtures.py

Each host writes, under host-<version>/, small Octet checkpoints of seeded random-tiny models of two
families (the SD1.5 UNet with int8 convs, a Flux DiT) and beside each ``<name>.expected.safetensors``:
a fixed input and what the quantized model computed on it on the writing host. test_cross_host.py
loads every host's files on the running host and compares. The files are committed: a file written by
an older host is exactly what users have on disk after upgrading ComfyUI.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

# name -> (architecture, unet_config, Octet mode, latent shape, context shape, pooled (y) size or None)
TINY_FLUX = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
             "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 1,
             "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True}
FIXTURES = {
    "sd15_dynamic_convs": ("SD15", None, "dynamic", (1, 4, 16, 16), (1, 8, 64), None),
    "flux_weight_only": ("Flux", TINY_FLUX, "weight_only", (1, 16, 8, 8), (1, 6, 32), 32),
}


def _pack():
    if "comfyui_octet" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_octet", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_octet"] = module
        spec.loader.exec_module(module)
    from comfyui_octet.nodes import host
    host.ensure_comfy(cpu=True)
    return sys.modules["comfyui_octet"]


def inputs(name: str) -> dict:
    """The fixed input of a fixture (seeded; the same on every host)."""
    _, _, _, latent, context, pooled = FIXTURES[name]
    g = torch.Generator().manual_seed(7)
    out = {"x": torch.randn(latent, generator=g), "sigma": torch.tensor([0.6]),
           "c_crossattn": torch.randn(context, generator=g)}
    if pooled:
        out["y"] = torch.randn(1, pooled, generator=g)
        out["guidance"] = torch.tensor([3.5])
    return out


def apply(patcher, name: str) -> torch.Tensor:
    """The host's own model call (what samplers use) on the fixture's input."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    args = inputs(name)
    x, sigma = args.pop("x"), args.pop("sigma")
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **args).float()


def build_float(name: str):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfyui_octet.nodes import host_compat
    from comfyui_octet.fixtures import reference_model

    arch, unet_config, *_ = FIXTURES[name]
    if unet_config is None:
        return reference_model.build_tiny_sd15()
    config = getattr(comfy.supported_models, arch)(host_compat.unet_config_for_host(unet_config, name))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.diffusion_model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() if p.dim() > 1 else 50) ** 0.5)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def main() -> None:
    _pack()
    from safetensors.torch import save_file

    from comfyui_octet.nodes import bridge, host_compat, model_files
    from comfyui_octet.octet import config_for_mode

    folder = os.path.join(HERE, f"host-{host_compat.host_version()}")
    os.makedirs(folder, exist_ok=True)
    for name, (_, _, mode, *_rest) in FIXTURES.items():
        quantized, _ = bridge.quantize_model(build_float(name), config_for_mode(mode, backend="torch"))
        path = os.path.join(folder, f"{name}.safetensors")
        if os.path.exists(path):
            os.remove(path)
        model_files.save_model(quantized, path)
        for extra in (".report.txt", ".report.json"):  # the per-layer tables; not part of the fixture
            if os.path.exists(path[:-len(".safetensors")] + extra):
                os.remove(path[:-len(".safetensors")] + extra)
        expected = {**inputs(name), "output": apply(quantized, name)}
        save_file({k: v.contiguous() for k, v in expected.items()}, path[:-len(".safetensors")] + ".expected.safetensors")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
