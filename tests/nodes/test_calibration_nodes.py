"""Calibrate, static W8A8 and the INT8 Sampler on the real host (stock KSampler path)."""
import pytest
import torch

from comfyui_octet.nodes import bridge, calibrate_nodes, model_files, sampling
from comfyui_octet.nodes.quantize_nodes import QuantizeModel
from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import OctetError, StaticW8A8Config
from comfyui_octet.octet.calibration import Calibration

STEPS = 6
SIZE = 8  # latent side: small keeps the file fast; every host code path is the same
# Quantize Model's static defaults (what Calibrate's widgets defaulted to when the settings lived there).
SETTINGS = {"observer": "mse", "percentile": 99.99, "timestep_groups": True, "smooth_alpha": 0.5}


def _conds():
    return reference_model.tiny_conditioning(batch=1, seed=1), reference_model.tiny_conditioning(batch=1, seed=2)


@pytest.fixture(scope="module")
def calibration(tiny_model):
    pos, neg = _conds()
    cal, _ = calibrate_nodes.calibrate(tiny_model, pos, neg, {"samples": torch.zeros(1, 4, SIZE, SIZE)}, 7, STEPS, 4.0,
                                       "euler", "normal", 3)
    return cal


@pytest.fixture(scope="module")
def static_model(tiny_model, calibration):
    q, _ = bridge.quantize_model(tiny_model, StaticW8A8Config(**SETTINGS), calibration=calibration)
    return q


def test_calibrate_hooks_every_layer_then_removes_them(tiny_model, calibration):
    dm = bridge.diffusion_model(tiny_model)
    assert not any(m._forward_pre_hooks for m in dm.modules())
    assert not tiny_model.get_all_wrappers("apply_model")
    assert calibration.groups == 3 and len(calibration.selector.boundaries) == 2
    # every quantizable layer was seen in every group (euler: one call per step, 2 steps per group)
    for name, stats in calibration.layers.items():
        assert (stats.calls == 2).all(), (name, stats.calls)


def test_calibration_records_what_the_layer_actually_received(tiny_model, rng):
    """Stats equal a direct computation on the same activations, captured independently."""
    dm = bridge.diffusion_model(tiny_model)
    name, layer = "input_blocks.1.1.proj_in", dm.input_blocks[1][1].proj_in
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        pos, neg = _conds()
        seed = int(torch.randint(0, 2**31, (1,), generator=rng))
        cal, _ = calibrate_nodes.calibrate(tiny_model, pos, neg, {"samples": torch.zeros(1, 4, SIZE, SIZE)}, seed, 4, 4.0,
                                           "euler", "normal", 2)
    finally:
        handle.remove()
    stats = cal.layers[name]
    groups = [0, 0, 1, 1][::-1]  # steps run from high sigma (group 1) to low (group 0)
    for g in (0, 1):
        xs = [x for x, gg in zip(seen, groups) if gg == g]
        assert float(stats.absmax[g]) == max(float(x.abs().max()) for x in xs)
        chan = torch.stack([x.abs().amax(dim=(0, 2, 3)) for x in xs]).amax(0)
        assert torch.equal(stats.channel_absmax[g], chan)


def test_group_follows_sigma_during_stock_ksampler(static_model, sample, calibration):
    import comfy.patcher_extension
    seen = []
    probe = static_model.clone()
    layer = next(iter(bridge.quantized_layers(probe).values()))

    def spy(executor, x, t, *args, **kwargs):  # runs after Octet's wrapper, before the model
        seen.append((float(t.max()), layer.group_selector.index))
        return executor(x, t, *args, **kwargs)

    probe.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_spy", spy)
    used = []
    hook = layer.register_forward_pre_hook(lambda m, a: used.append(m._static_scale(torch.device("cpu")).clone()))
    try:
        sample(probe, steps=STEPS, size=SIZE)
    finally:
        hook.remove()
    assert len(seen) == STEPS
    assert [g for _, g in seen] == [calibration.selector.group_of(s) for s, _ in seen]
    assert sorted({g for _, g in seen}) == [0, 1, 2]
    for (_, g), scale in zip(seen, used):
        assert torch.equal(scale, layer.input_scale[g:g + 1])


def test_static_model_samples_close_to_float(tiny_model, static_model, sample, rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    ref, out = sample(tiny_model, seed=seed, steps=STEPS, size=SIZE), sample(static_model, seed=seed, steps=STEPS, size=SIZE)
    psnr = 10 * torch.log10(ref.abs().max() ** 2 / (out - ref).pow(2).mean())
    assert psnr > 35, float(psnr)
    assert not torch.equal(ref, out)  # it really ran in INT8


def test_calibration_for_another_model_is_refused(calibration):
    other = reference_model.build_tiny_sd15(seed=reference_model.DEFAULT_SEED + 1)
    with pytest.raises(OctetError, match="recorded on another model"):
        bridge.quantize_model(other, StaticW8A8Config(**SETTINGS), calibration=calibration)


def test_quantized_checkpoint_keeps_scales_groups_and_samples_identically(static_model, sample, tmp_path, rng):
    path = str(tmp_path / "static.safetensors")
    model_files.save_model(static_model, path)
    loaded = model_files.load_model(path)
    a, b = bridge.quantized_layers(static_model), bridge.quantized_layers(loaded)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].input_scale, b[name].input_scale), name
        assert torch.equal(a[name].pre_quant_scale, b[name].pre_quant_scale), name
        assert b[name].group_selector.boundaries == a[name].group_selector.boundaries
    assert len({id(layer.group_selector) for layer in b.values()}) == 1
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    assert torch.equal(sample(static_model, seed=seed, steps=STEPS, size=SIZE), sample(loaded, seed=seed, steps=STEPS, size=SIZE))


def test_calibration_file_roundtrip_through_nodes(calibration, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, calibrate_nodes.FOLDER,
                        ([str(tmp_path)], {".safetensors"}))
    path = calibrate_nodes.SaveCalibration.execute(calibration, "sub/cal", False).result[0]
    with pytest.raises(OctetError, match="already exists"):
        calibrate_nodes.SaveCalibration.execute(calibration, "sub/cal", False)
    out = calibrate_nodes.LoadCalibration.execute("sub/cal.safetensors")
    back = out.result[0]
    assert isinstance(back, Calibration) and back.fingerprint == calibration.fingerprint
    assert "settings" not in back.info and "settings" not in out.result[1]
    for name, stats in calibration.layers.items():
        assert torch.equal(back.layers[name].hist, stats.hist)
    assert path.endswith("cal.safetensors")


def _scales(model):
    return {n: (layer.input_scale, layer.pre_quant_scale) for n, layer in bridge.quantized_layers(model).items()}


def _same_scales(a, b):
    assert set(a) == set(b)
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert (x is None and y is None) or torch.equal(x, y), name


def test_quantize_model_static_settings_are_its_own_widgets(tiny_model, calibration, static_model):
    """The static settings are Quantize Model's: left unset (an API workflow saved before they moved there) they
    are the old Calibrate defaults, given explicitly they are exactly the StaticW8A8Config of those values."""
    base = dict(model=tiny_model, mode="static", quantize_linear=True, quantize_conv=True, backend="auto",
                calibration=calibration)
    _same_scales(_scales(QuantizeModel.execute(**base).result[0]), _scales(static_model))
    explicit = dict(observer="percentile", percentile=99.9, use_timestep_groups=False, smooth_alpha=0.3,
                    smoothquant=True)
    q, report = QuantizeModel.execute(**base, **explicit).result
    want, _ = bridge.quantize_model(tiny_model, StaticW8A8Config(observer="percentile", percentile=99.9,
                                                                 timestep_groups=False, smooth_alpha=0.3),
                                    calibration=calibration)
    _same_scales(_scales(q), _scales(want))
    assert all(s[0].numel() == 1 for s in _scales(q).values())  # timestep groups off: one scale per layer
    # smoothquant off: no SmoothQuant divisor, whatever alpha says
    off = _scales(QuantizeModel.execute(**base, smoothquant=False, smooth_alpha=0.9).result[0])
    assert all(p is None for _, p in off.values())


def test_one_calibration_serves_every_observer(tiny_model, calibration):
    """The calibration holds statistics only; the observer is applied at quantize time, so minmax and mse from
    ONE calibration give different scales (mse clips, so never above minmax), on the same layers."""
    base = dict(model=tiny_model, mode="static", quantize_linear=True, quantize_conv=True, backend="auto",
                calibration=calibration, smoothquant=False)
    by = {obs: _scales(QuantizeModel.execute(**base, observer=obs).result[0]) for obs in ("minmax", "mse")}
    assert set(by["minmax"]) == set(by["mse"]) and by["mse"]
    lo = [torch.all(by["mse"][n][0] <= by["minmax"][n][0]) for n in by["mse"]]
    assert all(lo)
    assert any(not torch.equal(by["mse"][n][0], by["minmax"][n][0]) for n in by["mse"])
    minmax_direct = {n: float(s.absmax.max()) for n, s in calibration.layers.items()}
    some = next(iter(by["minmax"]))
    assert float(by["minmax"][some][0].max()) == pytest.approx(minmax_direct[some] / 127, rel=1e-6)


def test_quantize_model_validates_static_settings_with_the_config(tiny_model, calibration):
    base = dict(model=tiny_model, mode="static", quantize_linear=True, quantize_conv=True, backend="auto",
                calibration=calibration)
    with pytest.raises(ValueError, match="observer='max' is not supported"):
        QuantizeModel.execute(**base, observer="max")
    with pytest.raises(ValueError, match="percentile=40.0 must be in"):
        QuantizeModel.execute(**base, percentile=40.0)
    with pytest.raises(OctetError, match="Quantize Model: 'smooth_alpha'"):
        QuantizeModel.execute(**base, smooth_alpha=float("nan"))
    # Other modes ignore the static widgets.
    QuantizeModel.execute(**dict(base, mode="dynamic", calibration=None), observer="max")


def test_dynamic_mode_takes_smoothquant_from_a_connected_calibration(tiny_model, calibration):
    """Dynamic + a CALIBRATION + smoothquant on (the default): per-token scales on x / s, s from the calibration,
    exactly what octet.quantize_ builds for DynamicW8A8Config(smooth_alpha); without a calibration, plain dynamic."""
    from comfyui_octet.octet import DynamicW8A8Config
    base = dict(model=tiny_model, mode="dynamic", quantize_linear=True, quantize_conv=True, backend="auto")
    q = QuantizeModel.execute(**base, calibration=calibration, smooth_alpha=0.3).result[0]
    want, _ = bridge.quantize_model(tiny_model, DynamicW8A8Config(smooth_alpha=0.3), calibration=calibration)
    got, ref = _scales(q), _scales(want)
    assert got and set(got) == set(ref)
    for n in got:
        assert got[n][0] is None and got[n][1] is not None and torch.equal(got[n][1], ref[n][1]), n
    for kwargs in (dict(calibration=None), dict(calibration=calibration, smoothquant=False)):
        assert all(p is None for _, p in _scales(QuantizeModel.execute(**base, **kwargs).result[0]).values())


def test_int8_sampler_schedule(tiny_model, static_model, sample, rng):
    pos, neg = _conds()
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    args = (pos, neg, latent, seed, STEPS, 4.0, "euler", "normal", 1.0)
    # no float steps == the stock KSampler on the INT8 model
    out, text = sampling.sample_schedule(static_model, None, *args, 0, 0)
    assert torch.equal(out["samples"], sample(static_model, seed=seed, steps=STEPS, size=SIZE))
    assert text.count("int8") >= STEPS
    # an all-float schedule split into two segments == one float run (the chain is exact for euler)
    out, _ = sampling.sample_schedule(static_model, tiny_model, *args, 2, STEPS - 2)
    torch.testing.assert_close(out["samples"], sample(tiny_model, seed=seed, steps=STEPS, size=SIZE), rtol=1e-5, atol=1e-5)
    out, text = sampling.sample_schedule(static_model, tiny_model, *args, 1, 1)
    rows = [line.split() for line in text.splitlines()[2:2 + STEPS]]
    assert [r[2] for r in rows] == ["float"] + ["int8"] * (STEPS - 2) + ["float"]
    with pytest.raises(OctetError, match="float MODEL"):
        sampling.sample_schedule(static_model, None, *args, 1, 0)
    other = reference_model.build_tiny_sd15(seed=reference_model.DEFAULT_SEED + 1)
    with pytest.raises(OctetError, match="not the model the INT8 model was made from"):
        sampling.sample_schedule(static_model, other, *args, 1, 0)
