"""Nodes that must match the user's sampler share KSampler's defaults; Calibrate says when coverage is narrow."""
import pytest

from comfyui_octet.nodes import sampling, sampling_defaults as sd
from comfyui_octet.octet.calibration import coverage_notes, sampler_mismatch
from comfyui_octet.nodes.calibrate_nodes import Calibrate
from comfyui_octet.nodes.eval_nodes import Evaluate
from comfyui_octet.nodes.policy_nodes import SensitivityPolicy
from comfyui_octet.nodes.qat_nodes import QATFineTune
from comfyui_octet.nodes.sampler_nodes import Int8Sampler


def _defaults(node):
    return {i.id: i.default for i in node.define_schema().inputs if i.id in ("cfg", "scheduler", "sampler_name")}


@pytest.mark.parametrize("node", [Calibrate, Evaluate, SensitivityPolicy, QATFineTune, Int8Sampler])
def test_sampling_nodes_default_to_ksampler_settings(node):
    import nodes
    ks = nodes.KSampler.INPUT_TYPES()["required"]
    expected = {"cfg": ks["cfg"][1]["default"], "scheduler": ks["scheduler"][0][0], "sampler_name": ks["sampler_name"][0][0]}
    assert (sd.CFG, sd.SCHEDULER, sd.SAMPLER) == (expected["cfg"], expected["scheduler"], expected["sampler_name"])
    got = _defaults(node)
    assert got and all(got[k] == expected[k] for k in got), got


def test_calibrate_warns_about_few_prompts_and_other_sampler_settings():
    import torch
    three = [[torch.arange(3.0).repeat_interleave(4).view(12, 1, 1).expand(12, 4, 8).contiguous(), {}]]
    info = sampling.describe_conditioning(three)
    assert info["distinct"] == 3
    notes = coverage_notes(info)
    assert len(notes) == 1 and "3 distinct" in notes[0]
    many = [[torch.arange(12.0).view(12, 1, 1).expand(12, 4, 8).contiguous(), {}]]
    assert coverage_notes(sampling.describe_conditioning(many)) == []
    cal = {"sampler": {"steps": 20, "cfg": 8.0, "sampler": "euler", "scheduler": "simple"}}
    assert sampler_mismatch(cal, 20, 8.0, "euler", "simple") == []
    msg = sampler_mismatch(cal, 20, 4.0, "euler", "normal")
    assert len(msg) == 1 and "cfg 8.0 -> 4.0" in msg[0] and "scheduler simple -> normal" in msg[0]
    assert sampler_mismatch(None, 20, 4.0, "euler", "normal") == []
