"""Mixed-Precision Policy and Sensitivity Policy nodes on the real host, end to end."""
import json
import os

import pytest
import torch

from comfyui_octet.nodes import bridge, model_files
from comfyui_octet.fixtures import reference_model
from comfyui_octet.nodes.policy_nodes import MixedPrecisionPolicy, SensitivityPolicy
from comfyui_octet.octet import config_for_mode
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.checkpoint import read
from comfyui_octet.octet.policy import Policy

SD15_KEEP = {"time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"}


def policy_node(model=None, preset="auto", rules="", overrides="", conservative=False, default_action="default"):
    return MixedPrecisionPolicy.execute(preset, conservative, default_action, rules, overrides, model).result


def sensitivity_node(model, seed=0, budget="max_float_share", value=0.1, block_depth=2, mode="dynamic", size=8):
    latent = {"samples": torch.zeros(1, 4, size, size)}
    pos = reference_model.tiny_conditioning(seed=1)
    return SensitivityPolicy.execute(model, pos, latent, mode, budget, value, "auto", seed, 2, 1.0, "normal",
                                     block_depth).result


def test_every_input_has_a_tooltip():
    for node in (MixedPrecisionPolicy, SensitivityPolicy):
        info = node.GET_NODE_INFO_V1()
        assert info["category"] == "octet"
        for name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node.__name__}.{name}"


def test_policy_node_detects_the_preset_and_quantize_skips_its_layers(tiny_model):
    policy, text = policy_node(tiny_model, rules="*.attn2.to_k: keep\n*.attn2.to_kk: keep")
    assert policy.name == "preset:SD15+2 rules"
    assert "WARNING rules matching no layer (typo?): *.attn2.to_kk" in text
    assert "input_blocks.0.0" in text and "keep" in text  # the per-layer preview
    _, result = bridge.quantize_model(tiny_model, config_for_mode("dynamic"), policy=policy)
    kept = {r.name for r in result.skipped}
    expected = SD15_KEEP | {r.name for r in result.layers if ".emb_layers." in r.name or r.name.endswith("attn2.to_k")}
    assert kept == expected


def test_policy_node_errors_name_the_fix(tiny_model):
    with pytest.raises(OctetError, match="needs the MODEL input"):
        policy_node(None, preset="auto")
    with pytest.raises(OctetError, match="does not have"):
        policy_node(tiny_model, overrides="out.3: keep")
    policy, _ = policy_node(None, preset="none", overrides="out.2: weight_only")
    assert policy.name == "1 overrides" and policy.action_for("out.2") == ("weight_only", "override")


def test_saved_checkpoint_leaves_kept_layers_in_float_and_carries_the_policy(tiny_model, tmp_path):
    policy, _ = policy_node(tiny_model, preset="SD15", overrides="output_blocks.0.0.skip_connection: keep")
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("weight_only"), policy=policy)
    path = str(tmp_path / "mixed.safetensors")
    model_files.save_model(quantized, path)
    ckpt = read(path)
    assert not (SD15_KEEP | {"output_blocks.0.0.skip_connection"}) & set(ckpt.layers)
    assert ckpt.tensors["out.2.weight"].is_floating_point()
    assert Policy.from_dict(ckpt.octet["policy_spec"]).action_for("out.2")[0] == "keep"
    report = open(str(tmp_path / "mixed.report.txt")).read()
    assert "output_blocks.0.0.skip_connection" in report and "override" in report
    layers = json.load(open(str(tmp_path / "mixed.report.json")))["layers"]
    assert {r["name"] for r in layers if r["decision"] == "skipped"} >= SD15_KEEP
    loaded = model_files.load_model(path)
    assert set(bridge.quantized_layers(loaded)) == set(bridge.quantized_layers(quantized))


def test_sensitivity_node_is_deterministic_and_respects_the_budget(tiny_model):
    bridge.quantized_layers(tiny_model)  # unloads quantized clones of other tests: they share this torch model
    before = {k: v.clone() for k, v in tiny_model.model.diffusion_model.state_dict().items()}
    p1, t1 = sensitivity_node(tiny_model, seed=7, value=0.1)
    p2, t2 = sensitivity_node(tiny_model, seed=7, value=0.1)
    assert t1 == t2 and p1.to_dict() == p2.to_dict()
    assert "kept by preset SD15" in t1 and "max_float_share=0.1" in t1
    share = float(t1.split("keep ")[1].split("(")[1].split("%")[0])
    assert share <= 10.0
    after = tiny_model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not bridge.quantized_layers(tiny_model)


def _silence_and_plant(model, block):
    """Like the core test: a channel silenced by its GroupNorm feeds huge conv weights. Float output is
    unchanged; the INT8 per-row scales of that conv are ruined."""
    rb = model.model.diffusion_model.get_submodule(block)
    norm, conv = rb.out_layers[0], rb.out_layers[3]
    c = 3
    with torch.no_grad():
        norm.weight[c] = 0.0
        norm.bias[c] = -20.0  # SiLU(-20) ~ -4e-8
        conv.weight[:, c] = 300 * conv.weight.abs().max()


def test_sensitivity_node_ranks_a_planted_outlier_block_first(rng):
    blocks = ["input_blocks.1.0", "input_blocks.3.0", "middle_block.0", "output_blocks.1.0", "output_blocks.3.0"]
    block = blocks[int(torch.randint(0, len(blocks), (1,), generator=rng))]
    model = reference_model.build_tiny_sd15()
    _silence_and_plant(model, block)
    policy, text = sensitivity_node(model, seed=int(torch.randint(0, 1000, (1,), generator=rng)), value=0.5)
    table = text.split("\n\n")[1].splitlines()
    unit = ".".join(block.split(".")[:2])
    assert table[2].split()[0] == unit, text[:2000]
    assert table[2].split()[4] == "keep"
    conv = f"{block}.out_layers.3"
    assert policy.action_for(conv)[0] == "keep" and "rank 1/" in policy.decide(conv, None, config_for_mode("dynamic"))[1]


def test_sensitivity_min_psnr_budget_is_met_when_sampling(tiny_model, sample):
    with torch.inference_mode():  # as the ComfyUI server executes nodes
        policy, text = sensitivity_node(tiny_model, budget="min_psnr", value=60.0)
    measured = float(text.split(", measured ")[1].split(" dB")[0])
    assert measured >= 60.0
    fp = sample(tiny_model)
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"), policy=policy)
    q = sample(quantized)
    psnr = 10 * torch.log10((fp.max() - fp.min()) ** 2 / ((q - fp) ** 2).mean())
    assert psnr > 30.0
