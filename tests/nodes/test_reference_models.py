"""The shipped reference models, their twins, and the Evaluate / Profile nodes inside the real host."""
import pytest
import torch

from comfyui_octet.nodes import evaluate

from comfyui_octet.fixtures import reference_model as rm, reference_twin


KINDS = tuple(rm.SPECS)  # unet (SD1.5), dit (Flux), mmdit (SD3)


@pytest.fixture(scope="module")
def models():
    return {(k, v): rm.load_reference(k, v) for k in KINDS for v in rm.VARIANTS}


def _forward(patcher, kind, seed=0):
    s = rm.spec(kind)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, s.latent_channels, s.latent_size, s.latent_size, generator=g)
    c = rm.batch_conditioning(kind, [5, rm.NULL_CLASS])
    kw = {"context": c[0][0]}
    if kind in rm.FLOW_KINDS:
        kw["y"] = c[0][1]["pooled_output"]
    t = (torch.tensor([700.0, 100.0]) if kind == "unet"
         else rm.model_sampling(kind).timestep(torch.tensor([0.7, 0.1])))  # SD3's timestep is 1000 * sigma
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_twin_computes_the_same_float_function_with_outliers(models, kind):
    plain, twin = models[(kind, "plain")], models[(kind, "twin")]
    out = {}
    # One forward each, hooked: the outputs are compared and the activations measured in the same pass.
    r_plain = reference_twin.channel_outlier_ratios(plain.model.diffusion_model,
                                                    lambda: out.setdefault("a", _forward(plain, kind)))
    r_twin = reference_twin.channel_outlier_ratios(twin.model.diffusion_model,
                                                   lambda: out.setdefault("b", _forward(twin, kind)))
    a, b = out["a"], out["b"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    sites = twin.model_options["octet_reference"]["twin"]
    consumers = [c for site in sites for c in site["consumers"]]
    summary = reference_twin.summarize_ratios(r_plain, r_twin, consumers)
    assert summary["median_ratio_consumers_twin"] > 15 > summary["median_ratio_consumers_plain"]


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_models_sample_finite_images_through_ksampler(models, kind):
    import nodes
    p = models[(kind, "plain")]
    # The sampling object we trained against is the one the host's loaded model carries.
    assert torch.allclose(rm.model_sampling(kind).sigmas, p.model.model_sampling.sigmas)
    pos = rm.batch_conditioning(kind, [7, 1])
    neg = rm.class_conditioning(kind, "unconditional", batch=2)
    out = nodes.common_ksampler(p, 3, 2, 3.0, "euler", "normal", pos, neg, rm.empty_latent(kind, 2))[0]["samples"]
    img = rm.decode(p, out)
    assert img.shape == (2, 1, 32, 32) and torch.isfinite(img).all() and img.std() > 0.05


def test_reference_nodes():
    from comfyui_octet.nodes.reference_nodes import (ReferenceConditioning, ReferenceLatent, ReferenceModel)
    m = ReferenceModel.execute(model="dit", variant="twin").result[0]
    assert m.model_options["octet_reference"]["variant"] == "twin"
    assert type(m.model.model_config).__name__ == "Flux"
    cond = ReferenceConditioning.execute(model="unet", class_name="bag", batch=2).result[0]
    assert cond[0][0].shape == (2, rm.COND_TOKENS, rm.COND_DIM)
    assert ReferenceLatent.execute(model="dit", batch=3).result[0]["samples"].shape == (3, 16, 8, 8)
    m = ReferenceModel.execute(model="mmdit", variant="plain").result[0]
    assert type(m.model.model_config).__name__ == "SD3"
    assert type(m.model.diffusion_model).__name__ == "OpenAISignatureMMDITWrapper"
    assert ReferenceLatent.execute(model="mmdit", batch=2).result[0]["samples"].shape == (2, 16, 8, 8)
    with pytest.raises(ValueError, match="no twin"):
        ReferenceModel.execute(model="random-tiny", variant="twin")


def test_mmdit_twin_stresses_both_streams_of_joint_attention(models):
    # The SD3 twin plants outliers in the image stream (x_block) and the text stream (context_block) of every
    # joint block, at qkv and (where the block has one) the MLP.
    sites = models[("mmdit", "twin")].model_options["octet_reference"]["twin"]
    consumers = {c for site in sites for c in site["consumers"]}
    blocks = len(models[("mmdit", "plain")].model.diffusion_model.joint_blocks)
    assert {f"joint_blocks.{i}.x_block.attn.qkv" for i in range(blocks)} <= consumers
    assert {f"joint_blocks.{i}.context_block.attn.qkv" for i in range(blocks)} <= consumers
    assert f"joint_blocks.{blocks - 1}.context_block.mlp.fc1" not in consumers  # pre_only: no MLP there


def test_mmdit_samples_recognisable_classes(models):
    import nodes
    from comfyui_octet.nodes import evaluate as ev
    p = models[("mmdit", "plain")]
    labels = [i % 10 for i in range(20)]
    pos = rm.batch_conditioning("mmdit", labels)
    neg = rm.class_conditioning("mmdit", "unconditional", batch=20)
    out = nodes.common_ksampler(p, 0, 12, 3.0, "euler", "normal", pos, neg, rm.empty_latent("mmdit", 20))[0]["samples"]
    clf, _ = ev.classifier()
    with torch.no_grad():
        acc = (clf(rm.decode(p, out)).argmax(1) == torch.tensor(labels)).float().mean().item()
    # A class-conditional generator (chance is 0.1). It was trained ~4 CPU-minutes and its samples keep speckle
    # that the classifier dislikes: 0.40 measured on 40 images (models/README.md).
    assert acc >= 0.25, acc


def test_evaluate_node_runs_inside_comfyui(models):
    from comfyui_octet.nodes import bridge, model_files
    from comfyui_octet.nodes.eval_nodes import Evaluate
    from comfyui_octet.octet import DynamicW8A8Config
    fp = models[("dit", "plain")]
    q, _ = bridge.quantize_model(fp, DynamicW8A8Config())
    pos = rm.batch_conditioning("dit", [0, 7])
    neg = rm.class_conditioning("dit", "unconditional", batch=2)
    report, grid, chart = Evaluate.execute(fp_model=fp, quant_model=q, positive=pos, negative=neg,
                                           latent_image=rm.empty_latent("dit", 2), seed=1, steps=3, cfg=3.0,
                                           sampler_name="euler", scheduler="normal").result
    assert "PSNR vs FP" in report and "ms/step" in report and "FID vs FP   n/a" in report
    assert grid.dim() == 4 and grid.shape[-1] == 3 and chart.shape[-1] == 3


def test_compare_reports_fid_with_enough_images(rng):
    a = torch.rand(evaluate.FID_MIN_SAMPLES, 1, 32, 32, generator=rng)
    same = evaluate.compare(a, a, fid_features=True)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["ssim"] == pytest.approx(1.0)
    noisy = evaluate.compare(a, (a + 0.2 * torch.randn(a.shape, generator=rng)).clamp(0, 1), fid_features=True)
    assert noisy["fid"] > 0 and noisy["psnr"] < 20


def test_profile_node_runs_inside_comfyui(tiny_model):
    from comfyui_octet.nodes.eval_nodes import Profile
    pos = rm.tiny_conditioning(seed=1)
    table, chart = Profile.execute(model=tiny_model, positive=pos, negative=pos,
                                   latent_image={"samples": torch.zeros(1, 4, 8, 8)}, cfg=1.0, top=10).result
    lines = table.splitlines()
    assert len(lines) == 12 and "self ms" in lines[1]
    assert chart.dim() == 4 and chart.shape[-1] == 3


def test_saved_checkpoint_keeps_float_layers_in_the_source_dtype(models, tmp_path):
    """Issue 15: a model loaded from an fp16 file and run in fp32 saved its float layers as fp32 (1.18x the
    source). Float tensors keep the source dtype; the quantized layers keep int8 weights and fp32 scales."""
    from safetensors import safe_open

    from comfyui_octet.nodes import bridge, model_files
    from comfyui_octet.octet import WeightOnlyConfig
    from comfyui_octet.octet.policy import Policy, Rule
    fp = models[("mmdit", "plain")]
    assert fp.model.get_dtype() == torch.float32
    q, _ = bridge.quantize_model(fp, WeightOnlyConfig(), policy=Policy(rules=[Rule("final_layer", "keep")]))
    path = str(tmp_path / "mmdit_w8.safetensors")
    model_files.save_model(q, path)
    with safe_open(path, framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["final_layer.linear.weight"] == torch.float16          # kept float -> source dtype
    assert dtypes["joint_blocks.0.x_block.attn.qkv.weight"] == torch.int8
    assert dtypes["joint_blocks.0.x_block.attn.qkv.weight_scale"] == torch.float32
    import os
    assert os.path.getsize(path) <= 0.6 * os.path.getsize(rm.spec("mmdit").path)


def test_static_attribution_node_on_the_mmdit(models):
    """The node measures static vs dynamic per layer with a real calibration and returns a usable POLICY."""
    from comfyui_octet.nodes import bridge, calibrate_nodes, model_files
    from comfyui_octet.nodes.attribution_nodes import StaticAttribution
    from comfyui_octet.octet import StaticW8A8Config
    fp = models[("mmdit", "plain")]
    pos = rm.batch_conditioning("mmdit", [1, 5])
    neg = rm.class_conditioning("mmdit", "unconditional", batch=2)
    settings = {"observer": "mse", "percentile": 99.99, "timestep_groups": True, "smooth_alpha": 0.5}
    cal, _ = calibrate_nodes.calibrate(fp, pos, neg, rm.empty_latent("mmdit", 2), 3, 4, 3.0, "euler", "normal", 2)
    policy, text = StaticAttribution.execute(model=fp, positive=pos, negative=neg, latent=rm.empty_latent("mmdit", 1),
                                             calibration=cal, margin_db=1.0, base_preset="none", seed=1, steps=4,
                                             cfg=3.0, scheduler="normal", top=5).result
    assert "auto:" in text and "static - dynamic" in text and len(text.splitlines()) == 2 + 2 + 5
    # adaLN modulations take one row per sample: always dynamic.
    assert all(policy.action_for(n)[0] == "dynamic" for n in ("joint_blocks.0.x_block.adaLN_modulation.1",
                                                              "t_embedder.mlp.0"))
    q, _ = bridge.quantize_model(fp, StaticW8A8Config(**settings), policy=policy, calibration=cal)
    out = nodes_sample(q)
    assert torch.isfinite(out).all()


def nodes_sample(model):
    import nodes
    pos = rm.batch_conditioning("mmdit", [2, 3])
    neg = rm.class_conditioning("mmdit", "unconditional", batch=2)
    return nodes.common_ksampler(model, 0, 3, 3.0, "euler", "normal", pos, neg, rm.empty_latent("mmdit", 2))[0]["samples"]
