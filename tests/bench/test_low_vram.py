"""bench/low_vram.py's summary of a memory snapshot at an out-of-memory error (the GPU run is the bench itself):
live blocks summed by the innermost Python frame outside torch that allocated them, the filler left out."""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import low_vram  # noqa: E402


def _block(size, *files, state="active_allocated"):
    frames = [{"filename": f, "line": i + 1, "name": f"f{i}"} for i, f in enumerate(files)]
    return {"size": size, "state": state, "frames": frames}


def test_live_memory_is_summed_by_the_innermost_python_frame_outside_torch():
    mib = 1 << 20
    copy = ("??", "/x/torch/cuda/memory.py", "/r/kernels/operands.py", "/r/octet/modules.py")
    snapshot = {"segments": [{"blocks": [
        _block(8 << 30, "/r/bench/low_vram.py"),                         # the filler
        _block(63 * mib, *copy), _block(63 * mib, *copy), _block(1 * mib, *copy, state="inactive"),
        _block(5 * mib, "/h/comfy/model_patcher.py"),
        _block(2 * mib),                                                  # no stack recorded
    ]}]}
    rows = low_vram.live_by_site(snapshot, 8 << 30)
    assert [(gib, n, site) for gib, n, site, _ in rows] == [
        (round(126 * mib / 2**30, 3), 2, "kernels/operands.py:3 f2"),
        (round(5 * mib / 2**30, 3), 1, "comfy/model_patcher.py:1 f0"),
        (round(2 * mib / 2**30, 3), 1, "?")]
    assert rows[0][3] == ["octet/modules.py:4 f3"]                        # its callers, innermost first


def test_the_copy_ahead_variants_build_octets_defaults_with_the_copies_made_as_named(monkeypatch):
    """``octet_no_ahead`` copies in the call (nothing ahead), ``octet_ahead2`` two ahead; both are Quantize Model's
    defaults otherwise, so their rows compare with ``octet``'s (one ahead) in the same call."""
    from comfyui_octet.octet import stream_ahead
    built = []
    monkeypatch.setattr(low_vram.workflow, "build", lambda name, variant, *a: built.append(variant) or ("m", "how"))
    monkeypatch.setattr(stream_ahead, "AHEAD", stream_ahead.AHEAD)
    monkeypatch.setattr(stream_ahead, "_streams_usable", stream_ahead._streams_usable)
    usable = stream_ahead._streams_usable
    cuda = torch.device("cuda", 0)
    low_vram.build("sdxl", "octet", cuda, True)
    assert stream_ahead.AHEAD == 1 and stream_ahead._streams_usable is usable
    low_vram.build("sdxl", "octet_ahead2", cuda, True)
    assert stream_ahead.AHEAD == 2 and stream_ahead._streams_usable is usable
    low_vram.build("sdxl", "octet_no_ahead", cuda, True)
    assert stream_ahead._streams_usable(cuda) is False              # no copy ever made ahead
    assert built == ["octet", "octet", "octet"]
