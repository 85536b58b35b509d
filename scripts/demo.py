"""Headless demo: quantize the embedded reference model with Octet's nodes and sample it with
ComfyUI's real KSampler, save and reload the INT8 checkpoint, and print a report.

Run it with `make demo` (sets up .venv first). Writes out/demo/: the checkpoint, a preview PNG
(float vs INT8 latents through ComfyUI's SD1.5 latent-to-RGB factors) and report.txt.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "out", "demo")


def load_pack():
    # Import the repo as a package the way ComfyUI does (never put the root on sys.path:
    # our nodes/ would shadow ComfyUI's own nodes module).
    spec = importlib.util.spec_from_file_location("comfyui_octet", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_octet"] = pack
    spec.loader.exec_module(pack)
    return pack


def psnr(ref, x) -> float:
    import torch
    mse = ((ref.double() - x.double()) ** 2).mean()
    return float(10 * torch.log10((ref.double().max() - ref.double().min()) ** 2 / mse))


def preview(latents):
    """Latents -> RGB uint8 with the host's SD1.5 latent preview factors (no VAE needed)."""
    import comfy.latent_formats
    import torch
    f = torch.tensor(comfy.latent_formats.SD15().latent_rgb_factors)  # [4, 3]
    rgb = torch.einsum("bchw,cr->bhwr", latents.float() * 0.18215, f)
    rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-8)
    return (rgb * 255).round().to(torch.uint8)


def main() -> int:
    load_pack()
    from comfyui_octet.nodes import host
    host.ensure_comfy()
    import comfy.utils
    import nodes
    import torch
    from PIL import Image

    from comfyui_octet.nodes import bridge, reference_model
    from comfyui_octet.nodes.quantize_nodes import QuantizeModel

    os.makedirs(OUT, exist_ok=True)
    seed, steps, cfg, size = 42, 20, 4.0, 32
    print(f"Octet demo: ComfyUI at {host.find_comfyui()}; torch {torch.__version__}; device "
          f"{'cuda:' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    model = reference_model.build_tiny_sd15()
    dm_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"Reference model: ComfyUI SD15 UNet class, {dm_params / 1e6:.2f} M parameters (embedded, seeded)")
    pos, neg = reference_model.tiny_conditioning(seed=1), reference_model.tiny_conditioning(seed=2)
    latent = {"samples": torch.zeros(2, 4, size, size)}

    def sample(m):
        t0 = time.perf_counter()
        out = nodes.common_ksampler(m, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]["samples"]
        return out, time.perf_counter() - t0

    print(f"\n[1/4] Float sampling ({steps} steps, euler, cfg {cfg}, batch 2, latent {size}x{size})")
    fp, t_fp = sample(model)

    rows, images = [], [preview(fp)]
    for i, mode in enumerate(("weight_only", "dynamic")):
        print(f"\n[2/4] Quantize Model node, mode={mode}")
        t0 = time.perf_counter()
        qmodel, report = QuantizeModel.execute(model=model, mode=mode, quantize_linear=True, quantize_conv=True,
                                               backend="auto").result
        t_quant = time.perf_counter() - t0
        print(report.splitlines()[-1])
        q, t_q = sample(qmodel)
        rows.append((mode, report.splitlines()[-1], psnr(fp, q), t_quant, t_q))
        images.append(preview(q))

    print("\n[3/4] Save Quantized -> Load Quantized (dynamic W8A8)")
    path = os.path.join(OUT, "reference_sd15_int8.safetensors")
    if os.path.exists(path):
        os.remove(path)
    bridge.save_model(qmodel, path)
    reloaded = bridge.load_model(path)
    r, _ = sample(reloaded)
    identical = torch.equal(r, q)
    bf16_bytes = 2 * dm_params
    file_bytes = os.path.getsize(path)

    print("\n[4/4] Writing preview")
    grid = torch.cat([torch.cat(list(img), dim=0) for img in images], dim=1).numpy()
    png = os.path.join(OUT, "fp_vs_weight_only_vs_dynamic.png")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(png)

    lines = ["", "=" * 78, "Octet demo report (embedded SD15-architecture reference model, CPU)", "=" * 78,
             f"float sampling time: {t_fp:.2f} s for {steps} steps"]
    for mode, summary, p, tq, ts in rows:
        lines.append(f"{mode:>12}: {summary}")
        lines.append(f"{'':>12}  PSNR(INT8 vs FP latents) = {p:.2f} dB; quantize {tq:.2f} s; sampling {ts:.2f} s")
    lines += [f"checkpoint: {path}",
              f"  file size {file_bytes / 2**20:.2f} MiB vs bf16 model {bf16_bytes / 2**20:.2f} MiB "
              f"= {file_bytes / bf16_bytes:.3f}x",
              f"  reloaded model samples identically: {identical}",
              f"preview (rows: samples; columns: FP | weight-only | dynamic W8A8): {png}",
              "note: random-weight model; trained reference models come with issue 9. CPU uses the torch "
              "reference kernels; the Triton kernels run on NVIDIA GPUs."]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "report.txt"), "w") as f:
        f.write(text + "\n")
    ok = identical and all(p > 30 for _, _, p, _, _ in rows) and file_bytes / bf16_bytes <= 0.6
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
