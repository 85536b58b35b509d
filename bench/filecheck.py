"""What the load-time validation (octet/filecheck.py) costs next to reading the file.

Run from the repository root:  .venv/bin/python bench/filecheck.py [--mb 512] [--out DIR]
Builds a synthetic checkpoint of --mb megabytes shaped like a DiT (int8 weights with per-row scales,
input/pre-quant scales, float biases and norms; 3072-wide layers), saves it with checkpoint.save (which
writes the content hash), then times on this machine, best of 3, single thread:
  read       safetensors get_tensor + a copy of every tensor (what loading costs without checks),
  checkpoint.read (read + the full validation pass, content hash included),
  the hash alone and the validation without the hash.
Prints milliseconds, MB/s and the ratio read+validate / read; writes filecheck.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402


def _model(mb: int) -> torch.nn.Module:
    width, layers = 3072, max(1, mb * (1 << 20) // (3072 * 3072 * 4))
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers * 4)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def _best(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="approximate int8 weight bytes, in MB")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the hash uses its own threads (hashlib releases the GIL)
    octet_pack.load()
    from safetensors import safe_open
    from comfyui_octet import octet
    from comfyui_octet.octet import checkpoint, filecheck

    net = _model(args.mb)
    octet.quantize_(net, octet.DynamicW8A8Config())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.safetensors")
        checkpoint.save(path, net, {"architecture": "bench"})
        size = os.path.getsize(path)

        def read_only():  # every byte read (a loader copies the weights to the device), no checks
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}
        tensors = read_only()
        ckpt = checkpoint.read(path)
        t_read = _best(read_only)
        t_full = _best(lambda: checkpoint.read(path))
        t_hash = _best(lambda: filecheck.content_hash(tensors))
        octet_no_hash = {k: v for k, v in ckpt.octet.items() if k != filecheck.HASH_KEY}
        t_checks = _best(lambda: checkpoint.validate("bench", octet_no_hash, ckpt.layers, tensors))
    mb = size / 2**20
    rows = {"read + copy of every byte (no checks)": t_read, "checkpoint.read (read + validation + hash)": t_full,
            "content hash alone": t_hash, "validation without hash": t_checks}
    print(f"file {mb:.0f} MB, {len(tensors)} tensors, 1 thread, {os.cpu_count()} CPUs visible")
    for name, t in rows.items():
        print(f"  {name:<45} {t * 1000:9.1f} ms  {mb / t:8.0f} MB/s")
    ratio = t_full / t_read
    print(f"  checkpoint.read / (read + copy): {ratio:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "filecheck.json"), "w") as f:
        json.dump({"file_mb": round(mb, 1), "tensors": len(tensors), "ms": {k: round(v * 1000, 1) for k, v in rows.items()},
                   "ratio_read_validate_over_read": round(ratio, 2)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
