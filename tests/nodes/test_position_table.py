"""SD3's position table in int8 under the memory goal (octet/tables.py), on the host's real MMDiT class: the crop
equals the host's own crop of the dequantized table, the quantized MODEL holds int8 codes while the source keeps
its float table, and save -> load -> save -> load gives the same codes."""
import numpy as np
import pytest
import torch

from comfyui_octet.nodes import bridge, model_files
from comfyui_octet.octet import config_for_mode, tables


def _patcher(model):
    import comfy.model_patcher
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _inputs(seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, size, size, generator=g)
    kw = {"c_crossattn": torch.randn(2, 5, 32, generator=g), "y": torch.randn(2, 32, generator=g)}
    return x, torch.tensor([0.7, 0.4]), kw


def _run(patcher, x, sigma, kw):
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, **kw), patcher.model.diffusion_model.pos_embed.dtype
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def test_rows_round_trip_exactly_through_their_dequantized_table():
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    sincos = torch.from_numpy(get_2d_sincos_pos_embed(256, 24).astype(np.float32)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 96, generator=g) * torch.logspace(-4, 2, 300).unsqueeze(1)
    rows[7] = 0.0                                               # an all-zero row keeps a usable scale
    for table in (sincos, rows.to(torch.bfloat16), rows):
        codes, scale = tables.quantize_rows(table)
        assert codes.dtype == torch.int8 and codes.abs().amax(1)[1:7].eq(127).all()
        deq = tables.dequantize_rows(codes, scale, table.dtype)
        # Error: half a step of the row's own scale, plus the output dtype's rounding.
        bound = scale / 2 + table.float().abs() * (2 ** -8 if table.dtype == torch.bfloat16 else 0)
        assert ((deq.float() - table.float()).abs() <= bound * 1.001).all()
        again_codes, again_scale = tables.quantize_rows(deq)
        assert torch.equal(again_codes, codes) and torch.equal(again_scale, scale)
    # The SD3 table itself (values in [-1, 1]): int8 per row is within 0.004 everywhere.
    codes, scale = tables.quantize_rows(sincos)
    assert float((tables.dequantize_rows(codes, scale, torch.float32) - sincos.float()).abs().max()) < 0.0040


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (32, 32), (2, 30)])
def test_crop_equals_the_hosts_crop_of_the_dequantized_table(tiny_sd35, hw):
    dm = tiny_sd35().diffusion_model
    float_table = dm.pos_embed.clone()
    found = tables.patches(dm)
    assert set(found) == {"pos_embed", "cropped_pos_embed"}
    codes, crop = found["pos_embed"], found["cropped_pos_embed"]
    assert codes.dtype == torch.int8 and codes.shape == float_table.shape
    dm.pos_embed = tables.dequantize_rows(codes, crop.scale, float_table.dtype)
    host = dm.cropped_pos_embed(hw)                     # the host's method on the dequantized table
    dm.pos_embed = codes
    ours = crop(hw)
    assert ours.dtype == float_table.dtype and torch.equal(ours, host)
    assert (ours - type(dm).cropped_pos_embed(_with_table(dm, float_table), hw)).abs().max() <= crop.scale.max()


def _with_table(dm, table):
    dm.pos_embed = table
    return dm


def test_crop_larger_than_the_table_says_so(tiny_sd35):
    dm = tiny_sd35().diffusion_model
    crop = tables.patches(dm)["cropped_pos_embed"]
    dm.pos_embed = tables.patches(dm)["pos_embed"]
    with pytest.raises(ValueError, match=r"34x34 latent is 17x17 patches, more than the model's table of 16x16"):
        crop((34, 34))


def test_memory_goal_quantizes_the_table_and_leaves_the_source_float(tiny_sd35):
    source = _patcher(tiny_sd35())
    x, sigma, kw = _inputs()
    float_out, float_dtype = _run(source, x, sigma, kw)
    # Weight-only: a dynamic activation scale would turn the table's small error into a rounding flip.
    speed, speed_result = bridge.quantize_model(source, config_for_mode("weight_only"))
    memory, result = bridge.quantize_model(source, config_for_mode("weight_only", goal="memory"))
    assert speed_result.attributes == {} and set(result.attributes) == {"pos_embed", "cropped_pos_embed"}
    table = 256 * 128 * 4                                       # fp32 table -> int8 codes + fp32 row scales
    assert (result.tables_before, result.tables_after) == (table, table // 4 + 256 * 4)
    assert speed.model_size() - memory.model_size() == table - table // 4 - 256 * 4
    assert "position table int8 (0.1 MiB -> 0.0 MiB)" in result.summary()
    speed_out, speed_dtype = _run(speed, x, sigma, kw)
    memory_out, memory_dtype = _run(memory, x, sigma, kw)
    assert (float_dtype, speed_dtype, memory_dtype) == (torch.float32, torch.float32, torch.int8)
    # The table's own error is small beside the INT8 layers': the same MODEL without the table's patches.
    float_table = memory.clone()
    for path in result.attributes:
        del float_table.object_patches[bridge.PREFIX + path]
    layers_out, layers_dtype = _run(float_table, x, sigma, kw)
    assert layers_dtype == torch.float32
    int8_err = (layers_out - float_out).abs().max()
    table_err = (memory_out - layers_out).abs().max()
    assert 0 < table_err < 0.1 * int8_err
    again, dtype = _run(source, x, sigma, kw)
    assert dtype == torch.float32 and torch.equal(again, float_out)


def test_memory_goal_file_keeps_the_float_table_and_reloads_the_same_codes(tiny_sd35, tmp_path):
    from safetensors import safe_open
    source = _patcher(tiny_sd35())
    float_table = source.model.diffusion_model.pos_embed.clone()
    memory, result = bridge.quantize_model(source, config_for_mode("dynamic", goal="memory"))
    x, sigma, kw = _inputs(seed=4)
    out, _ = _run(memory, x, sigma, kw)
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    model_files.save_model(memory, first)
    with safe_open(first, "pt") as f:
        assert torch.equal(f.get_tensor("pos_embed"), float_table)    # stock loaders read a float table
    loaded = model_files.load_model(first)
    dm = loaded.model.diffusion_model
    assert dm.pos_embed.dtype == torch.int8 and torch.equal(dm.pos_embed, result.attributes["pos_embed"])
    assert torch.equal(_run(loaded, x, sigma, kw)[0], out)
    # A loaded model saves its dequantized table, which loads back to the same codes and scales.
    model_files.save_model(loaded, second)
    reloaded = model_files.load_model(second)
    assert torch.equal(reloaded.model.diffusion_model.pos_embed, dm.pos_embed)
    assert torch.equal(tables.crops(reloaded.model.diffusion_model)[""].scale, tables.crops(dm)[""].scale)
    assert torch.equal(_run(reloaded, x, sigma, kw)[0], out)
