"""Host time of a UNet's fused float ops and INT8 convs per call: the host's ops, Octet's general path, Octet's
bound call (kernels/backends/triton_groupnorm.py ``GroupNorm``, triton_geglu.py ``Geglu``, triton_conv.py
``ConvW8A8``).

An eager SDXL step is host-bound, and per step it makes 46 GroupNorm (+ SiLU) calls, 70 GEGLU gates and 36 INT8
3x3 convs through these sites. Rows (what the model calls, site by site):
  GroupNorm + SiLU: a ResBlock's ``Sequential(GroupNorm, SiLU, Identity)`` through the host's forward, then through
  Octet's ``GroupNormSiLUForward`` with binding off (``OCTET_BIND=0`` when the site is made) and on;
  GEGLU gate: the host's chunk / gelu / multiply, then ``GegluForward`` (its projection an Identity) unbound / bound;
  INT8 conv 3x3: the host's bf16 conv (comfy.ops Conv2d), then ``ConvW8A8`` (the INT8 plan's call) unbound / bound.
Per variant: host us per call (the calling thread's CPU time to issue it, no synchronisation) and wall us per
call (the same calls, synchronised); rounds interleave the variants (the lent hosts' CPU speed drifts), medians.

On CUDA: SDXL's shapes at 1024² (batch 1), bf16, real kernels; outputs checked against the host's first. On a CPU
(no GPU here): tiny shapes, float32, and stand-in launchers (every key "learned", the C launch a no-op): the Python
each path runs per call, a proxy for host time, not a GPU number. Writes JSON (default out/fused_ops_host/).

    python3 bench/fused_ops_host.py [--rounds 30] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import octet_pack  # noqa: E402
from lean_blocks import time_call  # noqa: E402

# (name, kind, channels, spatial or tokens, calls per SDXL step at 1024²)
CASES = [("GroupNorm+SiLU 320x128x128", "groupnorm", 320, 128, 12),
         ("GroupNorm+SiLU 640x64x64", "groupnorm", 640, 64, 12),
         ("GroupNorm+SiLU 1280x32x32", "groupnorm", 1280, 32, 22),
         ("GEGLU gate 4096x2x2560", "geglu", 2560, 4096, 10), ("GEGLU gate 1024x2x5120", "geglu", 5120, 1024, 60),
         ("INT8 conv 320x128x128", "conv", 320, 128, 10), ("INT8 conv 640x64x64", "conv", 640, 64, 10),
         ("INT8 conv 1280x32x32", "conv", 1280, 32, 16)]
TINY = [(name, kind, 64, 4, per_step) for name, kind, _, _, per_step in CASES]
VARIANTS = ("host", "octet unbound", "octet bound")


class _StandInRecords(dict):
    """CPU proxy: every key has a learned record whose C launch does nothing."""

    def get(self, key, default=None):
        from comfyui_octet.kernels.backends import triton_launch
        return triton_launch.Record(None, 0, None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), (),
                                    lambda gx, gy, gz, stream, args: None)


def stand_in(launcher):
    launcher.direct, launcher._stream, launcher._device = True, (lambda device: 0), (lambda: -1)
    launcher.records = _StandInRecords()


def build(kind, channels, size, device, dtype, bind: bool):
    """(what to keep alive, the host's call, Octet's call, Octet's site) for one case; ``bind`` is read by the
    Octet site when it makes its kernel object."""
    import comfy.ops
    import torch
    import torch.nn as nn
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_conv
    from comfyui_octet.octet import float_fusions

    ops = comfy.ops.disable_weight_init
    g = torch.Generator(device=device).manual_seed(0)
    os.environ["OCTET_BIND"] = "1" if bind else "0"
    if kind == "groupnorm":
        seq = nn.Sequential(ops.GroupNorm(32, channels), nn.SiLU(), nn.Identity()).to(device=device, dtype=dtype)
        with torch.no_grad():   # comfy.ops leaves weights uninitialised: the same values in every build
            seq[0].weight.copy_(1 + 0.3 * torch.randn(channels, device=device, generator=g))
            seq[0].bias.copy_(0.2 * torch.randn(channels, device=device, generator=g))
        x = torch.randn(1, channels, size, size, device=device, dtype=dtype, generator=g)
        site = float_fusions.GroupNormSiLUForward(seq)
        with torch.inference_mode():
            site(x)     # the site makes its kernel object at its first call: it reads OCTET_BIND then
        return seq, (lambda: nn.Sequential.forward(seq, x)), (lambda: site(x)), site
    if kind == "geglu":
        h = torch.randn(1, size, 2 * channels, device=device, dtype=dtype, generator=g)
        holder = nn.Module()
        holder.proj = nn.Identity()
        site = float_fusions.GegluForward(holder)
        with torch.inference_mode():
            site(h)

        def host():
            a, gate = h.chunk(2, dim=-1)
            return a * torch.nn.functional.gelu(gate)
        return holder, host, (lambda: site(h)), site
    conv = ops.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.normal_(0, (9 * channels) ** -0.5, generator=g)
        conv.bias.normal_(0, 0.1, generator=g)
    qweight, scale = torch_ref.quantize_weight(conv.weight.float().reshape(channels, -1))
    site = triton_conv.ConvW8A8(qweight.view(conv.weight.shape), scale, conv.bias, 1, 1, 1, 1, None)
    if device.type != "cuda":
        for launcher in (site.quantizer.absmax, site.quantizer.quantize, site.launcher):
            stand_in(launcher)
    x = torch.randn(1, channels, size, size, device=device, dtype=dtype, generator=g)
    return conv, (lambda: conv(x)), (lambda: site(x)), site


def bound_calls(site) -> int:
    """How many bound calls a site holds (its kernel objects' for the float fusions)."""
    holders = site._kernels.values() if hasattr(site, "_kernels") else [site]
    return sum(callable(call) for holder in holders for call in holder._calls.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=20, help="calls per timing")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "fused_ops_host"))
    args = parser.parse_args()

    import torch
    cuda = torch.cuda.is_available()
    octet_pack.load(comfy=True, cpu=not cuda)
    from comfyui_octet.kernels.backends import triton_launch
    from comfyui_octet.octet import deferred

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    saved_env = {k: os.environ.get(k) for k in ("OCTET_BIND", "OCTET_FLOAT_FUSIONS")}
    os.environ["OCTET_FLOAT_FUSIONS"] = "1"
    if not cuda:
        torch.set_num_threads(1)
        # Stand-ins for what runs only on a GPU: the sites' shared launchers and "kernels run on this tensor".
        deferred._kernels_run_on = lambda t: True
        from comfyui_octet.kernels.backends import triton_geglu, triton_groupnorm
        for kernel, name in ((triton_groupnorm._gn_stats_kernel, "group_norm_stats"),
                             (triton_groupnorm._gn_apply_kernel, "group_norm_apply"),
                             (triton_geglu._geglu_kernel, "geglu")):
            stand_in(triton_launch.shared(kernel, name))
    card = torch.cuda.get_device_name() if cuda else "cpu (proxy: tiny shapes, stand-in launches)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"card: {card}; torch {torch.__version__}; SDXL's fused float ops and INT8 convs at 1024²; {stamp}"
    print(header, flush=True)
    rows = []
    try:
        for name, kind, channels, size, per_step in (CASES if cuda else TINY):
            # The sites hold their modules weakly: the modules are kept here while they are timed.
            kept, host, unbound, unbound_site = build(kind, channels, size, device, dtype, bind=False)
            kept_bound, _, bound, bound_site = build(kind, channels, size, device, dtype, bind=True)
            calls = {"host": host, "octet unbound": unbound, "octet bound": bound}
            with torch.inference_mode():
                outs = {v: calls[v]() for v in VARIANTS}   # the first calls: Triton's dispatch, learned keys
                outs = {v: calls[v]() for v in VARIANTS}   # the second: the bound call is made and used
                made = (bound_calls(unbound_site), bound_calls(bound_site))
                assert made[0] == 0 and made[1] == 1, f"{name}: bound calls made (unbound, bound site): {made}"
                if cuda:
                    assert torch.equal(outs["octet bound"], outs["octet unbound"]), f"{name}: bound != unbound"
                    if kind != "conv":     # INT8 vs bf16 conv: not comparable element for element
                        torch.testing.assert_close(outs["octet bound"].float(), outs["host"].float(), rtol=0.05,
                                                   atol=0.05)
                host_us = {v: [] for v in VARIANTS}
                wall_us = {v: [] for v in VARIANTS}
                for r in range(args.rounds):
                    for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
                        h, w = time_call(calls[v], sync, args.reps)
                        host_us[v].append(h * 1e6)
                        wall_us[v].append(w * 1e6)
            med = {v: statistics.median(host_us[v]) for v in VARIANTS}
            row = {"card": card, "case": name, "kind": kind, "calls_per_sdxl_step": per_step, "rounds": args.rounds,
                   "versions": {"torch": torch.__version__},
                   **{f"host_us {v}": med[v] for v in VARIANTS},
                   **{f"wall_us {v}": statistics.median(wall_us[v]) for v in VARIANTS},
                   "unbound_over_bound": statistics.median(a / b for a, b in zip(host_us["octet unbound"],
                                                                                  host_us["octet bound"])),
                   "host_ms_saved_per_step": (med["octet unbound"] - med["octet bound"]) * per_step / 1000,
                   "bound_minus_host_ms_per_step": (med["octet bound"] - med["host"]) * per_step / 1000}
            rows.append(row)
            print(f"[{card}] {name}: host us/call: host ops {med['host']:.1f}, "
                  f"Octet unbound {med['octet unbound']:.1f},"
                  f" bound {med['octet bound']:.1f} ({row['unbound_over_bound']:.2f}x); wall us: "
                  + ", ".join(f"{statistics.median(wall_us[v]):.1f}" for v in VARIANTS)
                  + f"; {row['host_ms_saved_per_step']:.2f} ms of host time less per SDXL step ({per_step} calls)",
                  flush=True)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    total = sum(r["host_ms_saved_per_step"] for r in rows)
    print(f"[{card}] binding saves {total:.2f} ms of host time per eager SDXL step (these sites)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fused_ops_host_{'cuda' if cuda else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows, "host_ms_saved_per_sdxl_step": total}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
