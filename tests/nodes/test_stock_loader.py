"""Files Octet writes, loaded by the running host's own stock loader (comfy.sd.load_diffusion_model).

Every file must either compute what Octet computes or be refused with an error that names Octet;
never load silently wrong. The table (docs/STOCK_LOADERS.md) comes from these tests run on both
hosts: ComfyUI 0.3.75 (no int8_tensorwise) and 0.29 (comfy-kitchen int8_tensorwise, ConvRot).

The tiny reference UNet is an SD15 class with a config no stock model matches, so the test
registers a model class for it at the front of the host's ``supported_models.models`` list; the
rest (state-dict handling, quant detection, mixed-precision ops, weight loading) is the host's.
"""
import json

import pytest
import torch

from comfyui_octet.nodes import bridge, model_files
from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import checkpoint, fileformat
from comfyui_octet.octet.config import config_for_mode
from comfyui_octet.octet.modules import QuantLayer


def _host_has_int8() -> bool:
    import comfy.quant_ops
    return "int8_tensorwise" in getattr(comfy.quant_ops, "QUANT_ALGOS", {})


@pytest.fixture(scope="module")
def stock_loader():
    """comfy.sd.load_diffusion_model, able to detect the tiny reference UNet, computing in fp32 (as the
    host does on a CPU without bf16/fp16 support), so its numbers can be compared tightly."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {"context_dim": reference_model.CONTEXT_DIM, "model_channels": 32,
                       "use_linear_in_transformer": False, "adm_in_channels": None,
                       "use_temporal_attention": False}

    comfy.supported_models.models.insert(0, TinySD15)
    mp = pytest.MonkeyPatch()
    mp.setattr(comfy.supported_models, "TinySD15", TinySD15, raising=False)  # Octet's loader finds it by name
    mp.setattr(mm, "should_use_bf16", lambda *a, **k: False)
    mp.setattr(mm, "should_use_fp16", lambda *a, **k: False)
    try:
        yield lambda path: comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32})
    finally:
        mp.undo()
        comfy.supported_models.models.remove(TinySD15)


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 400.0])
    ctx = torch.randn(2, 8, reference_model.CONTEXT_DIM, generator=g)
    return x, t, ctx


def _run(patcher):
    x, t, ctx = _inputs()
    with torch.no_grad():
        return bridge.diffusion_model(patcher)(x, timesteps=t, context=ctx).float()


def _octet_reference(patcher, float_convs=False):
    """What a stock int8_tensorwise host computes for Octet's layers: comfy-kitchen's INT8 GEMM with
    per-row dynamic activation scales, i.e. Octet's *dynamic* mode, on the same int8 weights; the
    layers a portable file dequantizes run as float layers with the dequantized weights."""
    import copy
    dm = copy.deepcopy(bridge.diffusion_model(patcher))
    layers = _float_convs(patcher) if float_convs else copy.deepcopy(bridge.quantized_layers(patcher))
    for name, layer in layers.items():
        if isinstance(layer, QuantLayer):
            layer.act = "dynamic"
        dm.set_submodule(name, layer)
    x, t, ctx = _inputs()
    with torch.no_grad():
        return dm(x, timesteps=t, context=ctx).float()


def _float_convs(patcher):
    """The same patcher's layers, with every INT8 conv as a float conv of its dequantized weight."""
    import copy
    layers = {}
    for name, layer in bridge.quantized_layers(patcher).items():
        if layer.weight.dim() == 4:
            f = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None)
            f.weight.data.copy_(layer.dequantized_weight(torch.float32))
            if layer.bias is not None:
                f.bias.data.copy_(layer.bias.float())
            layers[name] = f
        else:
            layers[name] = copy.deepcopy(layer)
    return layers


def _per_layer_errors(stock, reference_layers):
    """Run the stock model once; feed each reference layer the input its stock twin received and
    return the relative difference of their outputs, per layer."""
    dm = bridge.diffusion_model(stock)
    seen, hooks = {}, []
    for name in reference_layers:
        hooks.append(dm.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen.setdefault(name, (a[0].detach(), o.detach())) and None))
    try:
        _run(stock)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(reference_layers)
    with torch.no_grad():
        return {n: _rel(o, reference_layers[n](a)) for n, (a, o) in seen.items()}


def _dynamic(layers):
    import copy
    layers = copy.deepcopy(layers)
    for layer in layers.values():
        if isinstance(layer, QuantLayer):
            layer.act = "dynamic"
    return layers


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def quantized(tiny_model):
    """name -> quantized patcher, one per kind of layer Octet writes."""
    return {
        "dynamic linear+conv": bridge.quantize_model(tiny_model, config_for_mode("dynamic"))[0],
        "dynamic linear": bridge.quantize_model(tiny_model, config_for_mode("dynamic", kinds=("linear",)))[0],
        "weight-only linear": bridge.quantize_model(tiny_model, config_for_mode("weight_only",
                                                                                kinds=("linear",)))[0],
    }


def _smoothed(tiny_model):
    q, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic", kinds=("linear",)))
    layer = next(iter(bridge.quantized_layers(q).values()))
    layer.set_smoothing(torch.linspace(0.5, 2.0, layer.in_features))
    return q


def _static(tiny_model):
    """Static W8A8 Linear layers (scales set by hand: the file format is under test, not calibration)."""
    q, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic", kinds=("linear",)))
    for layer in bridge.quantized_layers(q).values():
        layer.act = "static"
        layer.set_static_scales(torch.tensor([0.02, 0.03]))
    return q


@pytest.mark.parametrize("case", ["dynamic linear+conv", "smoothquant linear"])
def test_octet_file_with_octet_only_layers_is_refused_by_the_stock_loader_naming_octet(quantized, stock_loader,
                                                                                        case, tiny_model, tmp_path):
    path = str(tmp_path / "octet.safetensors")
    model_files.save_model(quantized[case] if case in quantized else _smoothed(tiny_model), path)
    with pytest.raises(KeyError) as e:
        stock_loader(path)
    assert "Octet node pack" in str(e.value) or (not _host_has_int8() and "int8_tensorwise" in str(e.value))


@pytest.mark.parametrize("case", ["dynamic linear", "weight-only linear", "static linear"])
def test_octet_file_of_plain_int8_linears_runs_correctly_in_a_stock_int8_host(quantized, stock_loader, case,
                                                                               tiny_model, tmp_path):
    path = str(tmp_path / "octet.safetensors")
    if case == "static linear":
        quantized = {case: _static(tiny_model)}
    model_files.save_model(quantized[case], path)
    if not _host_has_int8():  # ComfyUI 0.3.75 knows no int8 format: a loud KeyError
        with pytest.raises(KeyError, match="int8_tensorwise"):
            stock_loader(path)
        return
    stock = stock_loader(path)
    # Layer by layer the host computes exactly Octet's dynamic W8A8 (comfy-kitchen's per-row INT8
    # GEMM) on the same int8 weights, whatever mode Octet ran them in ...
    errors = _per_layer_errors(stock, _dynamic(bridge.quantized_layers(quantized[case])))
    assert max(errors.values()) < 1e-3 and sorted(errors.values())[len(errors) // 2] < 1e-6, errors
    # ... and the whole model agrees to the noise of a rounding tie flipping here and there.
    out = _run(stock)
    assert torch.isfinite(out).all()
    assert _rel(out, _octet_reference(quantized[case])) < 0.05


def test_portable_file_runs_in_a_stock_int8_host_with_the_numbers_octet_wrote(quantized, stock_loader, tmp_path):
    q = quantized["dynamic linear+conv"]
    path = str(tmp_path / "portable.safetensors")
    meta = model_files.save_model(q, path, kind="portable")
    table = json.loads(meta["_quantization_metadata"])["layers"]
    assert table and all(s["format"] == "int8_tensorwise" for s in table.values())
    assert json.loads(meta["octet"])["file_kind"] == "portable"
    if not _host_has_int8():
        with pytest.raises(KeyError, match="int8_tensorwise"):
            stock_loader(path)
        return
    stock = stock_loader(path)
    errors = _per_layer_errors(stock, _dynamic(_float_convs(q)))
    assert max(errors.values()) < 1e-3 and sorted(errors.values())[len(errors) // 2] < 1e-6, errors
    out = _run(stock)
    assert _rel(out, _octet_reference(q, float_convs=True)) < 0.05
    # The stock loader's convs got float weights (the dequantized INT8 ones), never raw int8 codes.
    float_float = _run(reference_model.build_tiny_sd15())
    assert _rel(out, float_float) < 0.05


def test_octet_reads_its_portable_file_back_with_int8_linears_and_float_convs(quantized, tmp_path):
    q = quantized["dynamic linear+conv"]
    path = str(tmp_path / "portable.safetensors")
    model_files.save_model(q, path, kind="portable")
    loaded = model_files.load_model(path)
    layers = bridge.quantized_layers(loaded)
    assert layers and all(type(m).__name__ == "QuantLinear" for m in layers.values())
    assert "portable" in loaded.model_options[bridge.OPTIONS_KEY]["file_kind"]
    src = bridge.quantized_layers(q)
    for name, layer in layers.items():
        assert torch.equal(layer.weight, src[name].weight)
    assert _rel(_run(loaded), _octet_reference(q, float_convs=True)) < 1e-6


def test_octet_only_tensors_use_octet_keys_and_version_1_files_still_load(tiny_model, tmp_path):
    import comfy.utils  # noqa: F401  (host present; the rest is Octet's own reader)
    from safetensors import safe_open
    from safetensors.torch import save_file

    q, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    layers = bridge.quantized_layers(q)
    name = next(n for n, m in layers.items() if type(m).__name__ == "QuantLinear")
    smooth = torch.linspace(0.5, 2.0, layers[name].in_features)
    layers[name].set_smoothing(smooth)
    path = str(tmp_path / "v2.safetensors")
    model_files.save_model(q, path)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert f"{name}.octet_smooth" in keys and not any(k.endswith(".pre_quant_scale") for k in keys)
    assert json.loads(meta["octet"])["format_version"] == 2
    back = bridge.quantized_layers(model_files.load_model(path))
    assert torch.equal(back[name].pre_quant_scale, smooth)
    # The same file as Octet 1 wrote it: host key names with Octet's meaning.
    v1 = {(k.replace(".octet_smooth", ".pre_quant_scale").replace(".octet_input_scale", ".input_scale")): v
          for k, v in tensors.items()}
    octet = json.loads(meta["octet"])
    octet["format_version"] = 1
    from comfyui_octet.octet import filecheck
    octet.pop(filecheck.HASH_KEY)  # Octet 1 wrote no content hash (and the hash covers the stored key names)
    path1 = str(tmp_path / "v1.safetensors")
    save_file(v1, path1, metadata={**meta, "octet": json.dumps(octet)})
    back1 = bridge.quantized_layers(model_files.load_model(path1))
    assert torch.equal(back1[name].pre_quant_scale, smooth)
    assert torch.equal(back1[name].weight, layers[name].weight)


def test_portable_needs_an_int8_linear_and_unknown_kinds_are_clear_errors(tiny_model, tmp_path):
    convs_only, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic", kinds=("conv",)))
    with pytest.raises(checkpoint.OctetError, match="kind=octet"):
        model_files.save_model(convs_only, str(tmp_path / "p.safetensors"), kind="portable")
    with pytest.raises(checkpoint.OctetError, match="Unknown file kind"):
        model_files.save_model(convs_only, str(tmp_path / "p.safetensors"), kind="gguf")
    assert not list(tmp_path.iterdir())


def test_header_table_refuses_through_a_linear_even_when_only_convs_are_octet_only():
    layers = {"conv": {"format": fileformat.OCTET_FORMAT}, "lin": {"format": fileformat.HOST_FORMAT}}
    table = fileformat.host_layers(layers, ["lin", "other"])
    assert table["lin"]["format"] == fileformat.HOST_REFUSAL and table["conv"]["format"] == fileformat.HOST_REFUSAL
    table = fileformat.host_layers({"conv": {"format": fileformat.OCTET_FORMAT}}, ["float_lin"])
    assert table["float_lin"]["format"] == fileformat.HOST_REFUSAL
    assert fileformat.host_layers({"lin": {"format": fileformat.HOST_FORMAT}}, ["lin"]) == {
        "lin": {"format": fileformat.HOST_FORMAT}}


def test_quant_layers_are_the_only_int8_tensors_octet_writes(quantized, tmp_path):
    """A portable file's float layers are in the source dtype and its int8 tensors are Linear weights."""
    from safetensors import safe_open
    path = str(tmp_path / "p.safetensors")
    model_files.save_model(quantized["dynamic linear+conv"], path, kind="portable")
    with safe_open(path, "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dtype == torch.int8:
                assert t.dim() == 2, k
            elif k.endswith(".comfy_quant"):
                continue
            else:
                assert t.dtype == torch.float32, k  # the tiny model's source dtype
    assert all(isinstance(m, QuantLayer) for m in bridge.quantized_layers(quantized["dynamic linear+conv"]).values())


def test_a_convrot_community_file_computes_in_octet_as_in_the_stock_host(tiny_model, stock_loader, tmp_path):
    """The file Comfy-Org's converters publish (comfy-kitchen's ConvRot int8_tensorwise), for the tiny
    UNet: Octet's Load Quantized computes each layer as the host does (it used to read the rotated
    codes as the weight: 112 % error)."""
    ck = pytest.importorskip("comfy_kitchen.tensor")
    from safetensors.torch import save_file
    sd = {k: v.detach().clone() for k, v in bridge.diffusion_model(tiny_model).state_dict().items()}
    layers = {}
    for name, m in bridge.diffusion_model(tiny_model).named_modules():
        if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0:
            q, params = ck.TensorWiseINT8Layout.quantize(m.weight.detach(), per_channel=True, convrot=True,
                                                          convrot_groupsize=16)
            sd[f"{name}.weight"], sd[f"{name}.weight_scale"] = q, params.scale
            layers[name] = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}
            sd[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(layers[name]).encode()), dtype=torch.uint8)
    path = str(tmp_path / "community.safetensors")
    save_file(sd, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    octet = model_files.load_model(path)
    assert "community" in octet.model_options[bridge.OPTIONS_KEY]["file_kind"]
    octet_layers = bridge.quantized_layers(octet)
    assert set(octet_layers) == set(layers)
    assert _rel(_run(octet), _run(tiny_model)) < 0.05  # close to the float model it was made from
    # Saved again by Octet (both kinds), the ConvRot layers stay ConvRot for Octet and for the host.
    resaved = {kind: str(tmp_path / f"resaved_{kind}.safetensors") for kind in fileformat.KINDS}
    for kind, p in resaved.items():
        model_files.save_model(octet, p, kind=kind)
        again = bridge.quantized_layers(model_files.load_model(p))
        for name, layer in octet_layers.items():
            assert type(again[name]) is type(layer) and torch.equal(again[name].weight, layer.weight)
            assert again[name].group_size == layer.group_size
    if not _host_has_int8():  # 0.3.75 has no int8 format: its loader stops
        with pytest.raises(KeyError, match="int8_tensorwise"):
            stock_loader(path)
        return
    for p in (path, *resaved.values()):
        errors = _per_layer_errors(stock_loader(p), octet_layers)
        assert max(errors.values()) < 1e-3 and sorted(errors.values())[len(errors) // 2] < 1e-5, (p, errors)


def test_save_and_load_nodes_say_which_kind_of_file(quantized, tmp_path, monkeypatch):
    import folder_paths
    from comfyui_octet.nodes import checkpoint_nodes
    monkeypatch.setitem(folder_paths.folder_names_and_paths, checkpoint_nodes.FOLDER,
                        ([str(tmp_path / "diffusion_models")], {".safetensors"}))
    q = quantized["dynamic linear+conv"]
    n_linear = sum(type(m).__name__ == "QuantLinear" for m in bridge.quantized_layers(q).values())
    n_all = len(bridge.quantized_layers(q))
    path, kind = checkpoint_nodes.SaveQuantized.execute(q, "o", False).result
    assert f"Octet file ({n_all} INT8 layers, {n_all - n_linear} Octet-only)" in kind and "refuses" in kind
    path, kind = checkpoint_nodes.SaveQuantized.execute(q, "p", False, kind="portable").result
    assert f"portable file ({n_linear} int8_tensorwise" in kind
    for name, expect in (("o.safetensors", "only Octet's Load Quantized"), ("p.safetensors", "portable")):
        model, kind = checkpoint_nodes.LoadQuantized.execute(name, "auto").result
        assert expect in kind and bridge.quantized_layers(model)
