"""Flux's RoPE table (the host's EmbedND) alone at Flux-dev 1024²'s 4608 positions: eager, compiled by Inductor (as
a compiled Flux step computes it), and compiled with octet::rope_table (octet/rope_table.py: the module's own
forward as eager kernels inside the graph). GPU time of each in a CUDA graph, checked equal to eager; prints
ratios and writes JSON (rope_table.json). Needs ComfyUI on the path (bench/gpu_host029.sh) for the host's
EmbedND; a CPU run checks the three agree on a small table.

    python bench/rope_table.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import octet_pack  # noqa: E402


def flux_ids(h, w, txt, device="cpu"):
    """Flux's ids [1, txt + h * w, 3]: text tokens at 0, then the image's (0, row, column) positions."""
    img = torch.zeros(h, w, 3, device=device)
    img[..., 1] = torch.arange(h, device=device)[:, None]
    img[..., 2] = torch.arange(w, device=device)[None, :]
    return torch.cat([torch.zeros(1, txt, 3, device=device), img.reshape(1, h * w, 3)], dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    octet_pack.load(comfy=True, cpu=not torch.cuda.is_available())
    from comfy.ldm.flux.layers import EmbedND
    from comfyui_octet.octet import rope_table
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name() if cuda else "cpu"
    ids = flux_ids(64, 64, 512, dev) if cuda else flux_ids(4, 6, 8, dev)
    host = EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])
    patched = EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])
    patched.forward = rope_table.RopeTableForward(patched)
    ways = {"eager": host, "inductor": torch.compile(host), "octet::rope_table": torch.compile(patched)}
    reference = host(ids)
    row = {"card": card, "torch": torch.__version__, "positions": ids.shape[1], "us": {}}
    for name, fn in ways.items():
        out = fn(ids)
        row[f"max_abs_vs_eager_{name}"] = (out - reference).abs().max().item()
        if cuda:
            from gemm_shapes import graph_ms      # bench/gemm_shapes.py: GPU time alone, in a CUDA graph
            row["us"][name] = graph_ms(lambda f=fn: f(ids)) * 1000
            print(f"[{card}] RoPE table {ids.shape[1]} positions, {name:18s} {row['us'][name]:8.1f} us "
                  f"({row['us']['eager'] / row['us'][name]:.2f}x eager's speed; max |diff| vs eager "
                  f"{row[f'max_abs_vs_eager_{name}']:.2e})", flush=True)
    assert row["max_abs_vs_eager_octet::rope_table"] == 0, row
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rope_table.json"), "w") as f:
        json.dump(row, f, indent=1)
    print({k: v for k, v in row.items() if k != "us"})


if __name__ == "__main__":
    main()
