"""Community int8_tensorwise files (made here with comfy-kitchen's own quantize code) read as the host reads them.

References are comfy-kitchen's: ``TensorWiseINT8Layout.dequantize`` for the weight, and its eager
``int8_linear`` (per-row dynamic activations; ConvRot rotates the activations) for the GEMM.
"""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from comfyui_octet.octet import checkpoint, community
from comfyui_octet.octet.api import OctetError

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
ck_eager = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
Layout = ck_tensor.TensorWiseINT8Layout

# name -> (quantize kwargs, comfy_quant spec as comfy-kitchen/ComfyUI write it)
CASES = {
    "per-tensor": ({}, {"format": "int8_tensorwise"}),
    "per-row": ({"per_channel": True}, {"format": "int8_tensorwise"}),
    "convrot-16": ({"per_channel": True, "convrot": True, "convrot_groupsize": 16},
                   {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}),
    "convrot-64-in-params": ({"per_channel": True, "convrot": True, "convrot_groupsize": 64},
                             {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 64}}),
}


def _write(path, tensors, layers, in_file=True):
    """A comfy_quant file: per-layer comfy_quant tensors (optional) and the header's layer table."""
    out = dict(tensors)
    if in_file:
        for name, spec in layers.items():
            out[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)
    save_file(out, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                           "layers": layers})})
    return path


def _layer_file(tmp_path, case, seed, in_file=True, out_features=48, in_features=128):
    g = torch.Generator().manual_seed(seed)
    # Outlier columns, as real activations-facing weights have: ConvRot exists to spread them.
    w = torch.randn(out_features, in_features, generator=g) * (1 + 20 * (torch.rand(in_features, generator=g) > 0.95))
    bias = torch.randn(out_features, generator=g)
    kwargs, spec = CASES[case]
    qdata, params = Layout.quantize(w, **kwargs)
    path = _write(str(tmp_path / f"{case}.safetensors"),
                  {"blk.lin.weight": qdata, "blk.lin.weight_scale": params.scale, "blk.lin.bias": bias},
                  {"blk.lin": spec}, in_file)
    return w, bias, qdata, params, path


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("in_file", [True, False], ids=["comfy_quant", "header-only"])
def test_octet_decodes_each_int8_tensorwise_variant_to_comfy_kitchens_numbers(case, in_file, tmp_path, rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    w, bias, qdata, params, path = _layer_file(tmp_path, case, seed, in_file)
    ckpt = checkpoint.read(path)
    layer = checkpoint.build_layer("blk.lin", ckpt.layers["blk.lin"], ckpt.tensors)
    assert isinstance(layer, community.RotatedQuantLinear) == case.startswith("convrot")
    assert torch.equal(layer.weight, qdata)  # the codes as written: no second rounding

    ref_w = Layout.dequantize(qdata, params).float()
    assert torch.allclose(layer.dequantized_weight(), ref_w, rtol=0, atol=1e-6 * ref_w.abs().max().item())
    # The whole point of ConvRot: decoded right, the weight is the source weight, not its rotation.
    # (Rotated codes read as W are ~140% off. What remains is the format's own rounding: per-tensor
    # scales on these outlier columns reach ~6% at some seeds, per-row ~1%; the exact decode check is above.)
    assert ((layer.dequantized_weight() - w).norm() / w.norm()).item() < 0.25

    x = torch.randn(3, 5, w.shape[1], generator=rng)
    convrot = params.convrot
    ref = ck_eager.int8_linear(x, qdata, params.scale, bias, torch.float32, convrot, params.convrot_groupsize)
    out = layer(x)  # dynamic W8A8: comfy-kitchen's GEMM
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    layer.act = "none"  # weight-only: the host's dequantize-then-matmul
    ref_wo = torch.nn.functional.linear(x, ref_w, bias)
    assert ((layer(x) - ref_wo).norm() / ref_wo.norm()).item() < 1e-5


def test_convrot_layer_patches_and_merges_in_the_unrotated_basis(tmp_path, rng):
    """LoRA (the host's weight hooks) must see the real weight, and a merged patch must still compute W x."""
    w, bias, qdata, params, path = _layer_file(tmp_path, "convrot-16", 7)
    ckpt = checkpoint.read(path)
    layer = checkpoint.build_layer("blk.lin", ckpt.layers["blk.lin"], ckpt.tensors)
    raw = layer.weight.float()
    assert torch.allclose(layer.convert_weight(raw), Layout.dequantize(qdata, params).float(), atol=1e-5)
    delta = 0.01 * torch.randn_like(w)
    target = layer.dequantized_weight() + delta
    layer.set_weight(target)
    x = torch.randn(4, w.shape[1], generator=rng)
    ref = torch.nn.functional.linear(x, target, bias)
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02
    layer.weight_function.append(lambda t: t)  # a per-call patch: the float path, un-rotated weight
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.01


@pytest.mark.parametrize("spec, message", [
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 32}, "not a power of 4"),
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}, "does not divide"),
    ({"format": "int8_tensorwise", "full_precision_matrix_mult": True}, "full-precision"),
    ({"format": "float8_e4m3fn"}, "Load Diffusion Model"),
])
def test_what_octet_cannot_run_is_refused_naming_the_layer(spec, message, tmp_path):
    q = torch.randint(-127, 127, (8, 128), dtype=torch.int8)
    path = _write(str(tmp_path / "x.safetensors"), {"a.b.weight": q, "a.b.weight_scale": torch.rand(8, 1) + 0.1},
                  {"a.b": spec})
    with pytest.raises(OctetError, match=message) as e:
        checkpoint.read(path)
    assert "'a.b'" in str(e.value)


def test_an_int8_embedding_is_refused_not_replaced_by_a_linear(tmp_path):
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(16, 32))
    q, params = Layout.quantize(torch.randn(16, 32), per_channel=True)
    path = _write(str(tmp_path / "e.safetensors"), {"emb.weight": q, "emb.weight_scale": params.scale},
                  {"emb": {"format": "int8_tensorwise"}})
    with pytest.raises(OctetError, match="Embedding"):
        checkpoint.install(model, checkpoint.read(path))


def test_host_scales_of_other_meaning_on_int8_tensorwise_layers_are_ignored_like_the_host(tmp_path, rng):
    w, bias, qdata, params, path = _layer_file(tmp_path, "per-row", 3)
    extra = str(tmp_path / "extra.safetensors")
    _write(extra, {"blk.lin.weight": qdata, "blk.lin.weight_scale": params.scale, "blk.lin.bias": bias,
                   "blk.lin.pre_quant_scale": torch.full((w.shape[1],), 4.0), "blk.lin.input_scale": torch.ones(1)},
           {"blk.lin": {"format": "int8_tensorwise"}})
    ckpt = checkpoint.read(extra)
    layer = checkpoint.build_layer("blk.lin", ckpt.layers["blk.lin"], ckpt.tensors)
    assert layer.pre_quant_scale is None and layer.input_scale is None
    assert torch.allclose(layer.dequantized_weight(), Layout.dequantize(qdata, params).float(), atol=1e-6)
