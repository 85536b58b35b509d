"""ComfyUI's LoRA loading on Octet models, before and after Quantize Model, and under lowvram."""
import pytest
import torch

from comfyui_octet.nodes import bridge
from comfyui_octet.octet import config_for_mode


def _psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean()
    return float(10 * torch.log10((a.double().max() - a.double().min()) ** 2 / mse))


def _lora(model, g, rank=4, strength=0.5):
    """A LoRA in the diffusers-style key format ComfyUI's loader maps, on every attention projection."""
    sd = {}
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "ff.net.2")):
            out_f, in_f = m.weight.shape
            sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * strength
            sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * strength / rank
    assert sd
    return sd


def _apply(model, lora_sd):
    import comfy.sd
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
    assert len(patched.patches) == len(lora_sd) // 2
    return patched


@pytest.fixture
def lora_case(tiny_model, sample, rng):
    lora = _lora(tiny_model, rng)
    fp_lora = sample(_apply(tiny_model, lora))
    fp = sample(tiny_model)
    assert _psnr(fp_lora, fp) < 45  # the LoRA visibly changes the samples
    return lora, fp, fp_lora


def test_lora_after_quantize_matches_float_plus_lora(tiny_model, sample, lora_case):
    lora, fp, fp_lora = lora_case
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    q_lora = sample(_apply(quantized, lora))
    q_plain = sample(quantized)
    assert _psnr(fp_lora, q_lora) > 35
    assert _psnr(fp_lora, q_lora) > _psnr(fp_lora, q_plain) + 5
    # Unloading the LoRA clone restores the quantized weights and their original scales.
    assert torch.equal(sample(quantized), q_plain)


def test_lora_before_quantize_is_merged_into_the_int8_weights(tiny_model, sample, lora_case):
    lora, fp, fp_lora = lora_case
    quantized, _ = bridge.quantize_model(_apply(tiny_model, lora), config_for_mode("dynamic"))
    assert not any(k.endswith(".weight") and "attn" in k for k in quantized.patches)  # merged, not re-applied
    assert _psnr(fp_lora, sample(quantized)) > 35


def test_lora_reaches_int8_layers_exactly_merged_and_per_call(tiny_model, rng):
    """Full load merges the LoRA and re-quantizes; lowvram applies it per call to the dequantized
    weight. Checked on one layer against the LoRA delta computed by hand."""
    from comfyui_octet import kernels
    lora = _lora(tiny_model, rng)
    name = next(k for k in lora if k.endswith("lora_up.weight"))[len("diffusion_model."):-len(".lora_up.weight")]
    delta = lora[f"diffusion_model.{name}.lora_up.weight"] @ lora[f"diffusion_model.{name}.lora_down.weight"]
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("weight_only"))
    base = bridge.quantized_layers(quantized)[name].dequantized_weight()
    x = torch.randn(5, base.shape[1])
    cpu = torch.device("cpu")

    def layer_under(patcher, lowvram_bytes):
        bridge.release_clones(patcher)
        patcher.patch_model(device_to=cpu, lowvram_model_memory=lowvram_bytes)
        try:
            layer = patcher.model.diffusion_model.get_submodule(name)
            with torch.no_grad():
                return layer(x), bool(layer.weight_function), layer.dequantized_weight(), layer.bias
        finally:
            patcher.unpatch_model(device_to=cpu)

    y_merged, per_call, w_merged, bias = layer_under(_apply(quantized, lora), 0)
    q, scale = kernels.quantize_weight(base + delta)
    assert not per_call
    torch.testing.assert_close(w_merged, kernels.dequantize_weight(q, scale), rtol=0, atol=1e-6)
    torch.testing.assert_close(y_merged, torch.nn.functional.linear(x, w_merged, bias), rtol=1e-5, atol=1e-5)

    y_call, per_call, _, _ = layer_under(_apply(quantized, lora), 1)
    assert per_call
    torch.testing.assert_close(y_call, torch.nn.functional.linear(x, base + delta, bias), rtol=1e-4, atol=1e-4)

    # After unloading the LoRA clone the quantized layer is back to its own int8 weight and scales.
    y_plain, _, w_plain, _ = layer_under(quantized, 0)
    torch.testing.assert_close(w_plain, base, rtol=0, atol=0)
