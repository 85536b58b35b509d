"""Hostile-input tests run against the real ComfyUI (found by nodes/host.py), like tests/nodes."""
import os
import sys

import pytest
import torch

from comfyui_octet.nodes import host

host.ensure_comfy(cpu=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_files  # noqa: E402

SETTINGS = {"observer": "mse", "percentile": 99.99, "timestep_groups": True, "smooth_alpha": 0.5}


def build_valid_files(folder: str) -> dict:
    """A static W8A8 (timestep groups, SmoothQuant) checkpoint of the embedded tiny SD15 model and its
    calibration, saved by Octet: the valid files every hostile case starts from."""
    from comfyui_octet.nodes import bridge, calibrate_nodes, reference_model
    from comfyui_octet.octet import StaticW8A8Config

    model = reference_model.build_tiny_sd15()
    pos = reference_model.tiny_conditioning(batch=1, seed=1)
    neg = reference_model.tiny_conditioning(batch=1, seed=2)
    cal, _ = calibrate_nodes.calibrate(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 7, 6, 4.0, "euler",
                                       "normal", 3, dict(SETTINGS))
    q, _ = bridge.quantize_model(model, StaticW8A8Config(**SETTINGS), calibration=cal)
    os.makedirs(folder, exist_ok=True)
    ckpt, calib = os.path.join(folder, "valid_ckpt.safetensors"), os.path.join(folder, "valid_cal.safetensors")
    bridge.save_model(q, ckpt)
    cal.save(calib)
    return {"checkpoint": ckpt, "calibration": calib, "model": model, "quantized": q, "conds": (pos, neg)}


@pytest.fixture(scope="session")
def valid_files(tmp_path_factory):
    return build_valid_files(str(tmp_path_factory.mktemp("hostile_valid")))
