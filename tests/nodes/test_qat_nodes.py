"""QAT Fine-tune inside the real ComfyUI: teacher from the host KSampler, folded INT8 layers, save/load."""
import asyncio
import importlib
import os

import pytest
import torch

from comfyui_octet.nodes import bridge, model_files, sampling
from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import config_for_mode, qat
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.modules import QuantLayer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLER = dict(steps=4, cfg=4.0, sampler_name="euler", scheduler="normal")


def _conds(rng):
    seed = int(torch.randint(1 << 30, (1,), generator=rng))
    return reference_model.tiny_conditioning(batch=2, seed=seed), reference_model.tiny_conditioning(seed=seed + 1)


def _latent(size=8):
    return {"samples": torch.zeros(1, 4, size, size)}


def _w4(tiny_model):
    """4-bit weights: where PTQ is visibly off, so the test can tell training from noise."""
    dynamic, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    layers = qat.requantize(bridge.quantized_layers(dynamic), bridge.diffusion_model(tiny_model), 4)
    return bridge.with_layers(dynamic, layers)


def test_finetune_lowers_the_distillation_loss_and_folds_into_real_int8_layers(tiny_model, sample, rng, tmp_path):
    ptq = _w4(tiny_model)
    seed = int(torch.randint(1 << 20, (1,), generator=rng))
    config = qat.QATConfig(steps=30, lr=3e-3, lora_rank=2, weight_bits=4, seed=seed, eval_calls=4)
    seen = []
    tuned, result, text = sampling.finetune(tiny_model, ptq, *_conds(rng), _latent(), seed, SAMPLER["steps"],
                                             SAMPLER["cfg"], SAMPLER["sampler_name"], SAMPLER["scheduler"], 2, config,
                                             progress=lambda i, n, loss: seen.append(i), validate=False)
    # The mechanics of training and folding; whether a result is kept (held-back seed) is tested below and in
    # tests/octet/test_qat.py. The random tiny UNet's held-back samples are noise, so validation is off here.
    assert seen == list(range(1, 31)) and "held-back MSE after" in text and "validation off" in text
    layers, before = bridge.quantized_layers(tuned), bridge.quantized_layers(ptq)
    assert set(layers) == set(before)
    assert all(type(m) in (type(before[n]),) and m.weight.dtype == torch.int8 for n, m in layers.items())
    assert not any(isinstance(m, qat.FakeQuantLayer) for m in layers.values())
    assert sum(not torch.equal(m.weight, before[n].weight) or not torch.equal(m.weight_scale, before[n].weight_scale)
               for n, m in layers.items()) > len(layers) // 2  # the training reached the int8 layers
    # Inputs untouched: the float MODEL is float, the PTQ MODEL keeps its own layers.
    assert not any(isinstance(m, QuantLayer) for m in tiny_model.model.diffusion_model.modules())
    assert all(bridge.quantized_layers(ptq)[n] is m for n, m in before.items())
    # The result samples with the real kernels, and a saved checkpoint carries the learned parameters.
    out = sample(tuned, size=8)
    assert torch.isfinite(out).all()
    path = str(tmp_path / "qat.safetensors")
    model_files.save_model(tuned, path)
    loaded = model_files.load_model(path)
    for name, layer in bridge.quantized_layers(loaded).items():
        assert torch.equal(layer.weight, layers[name].weight) and torch.equal(layer.weight_scale,
                                                                              layers[name].weight_scale)
    assert torch.equal(sample(loaded, size=8), out)
    assert tuned.model_options["octet"]["qat"]["steps"] == 30


def test_qat_node_runs_inside_comfyui_under_inference_mode(tiny_model, rng):
    import nodes
    assert asyncio.run(nodes.load_custom_node(ROOT)) is True
    node = nodes.NODE_CLASS_MAPPINGS["OctetQATFineTune"]
    info = node.GET_NODE_INFO_V1()
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    pos, neg = _conds(rng)
    # The server executes nodes under torch.inference_mode; the node must still be able to train.
    with torch.inference_mode():
        out = node.execute(model=tiny_model, positive=pos, negative=neg, latent_image=_latent(), seed=3,
                           trajectories=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
                           train_steps=4, learning_rate=1e-3, lora_rank=2)
    model, log = out.result
    pack_bridge = importlib.import_module(node.__module__.rsplit(".", 1)[0] + ".bridge")
    layers = pack_bridge.quantized_layers(model)
    assert layers and all(m.act == "dynamic" for m in layers.values())
    assert "step 4/4" in log and "held-back MSE before" in log


def test_wrong_inputs_are_clear_errors(tiny_model, rng):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    args = (*_conds(rng), _latent(), 0, 2, 4.0, "euler", "normal", 1, qat.QATConfig(steps=1))
    with pytest.raises(OctetError, match="already quantized"):
        sampling.finetune(quantized, quantized, *args)
    with pytest.raises(OctetError, match="no Octet INT8 layers"):
        sampling.finetune(tiny_model, tiny_model, *args)
    other = reference_model.build_tiny_sd15(seed=7)
    with pytest.raises(OctetError, match="other float weights"):
        sampling.finetune(other, quantized, *args)


def test_a_run_that_makes_things_worse_hands_back_the_ptq_layers(tiny_model, rng):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    config = qat.QATConfig(steps=3, lr=0.5, lora_rank=4, eval_calls=2)  # a learning rate that wrecks W8A8
    out, result, text = sampling.finetune(tiny_model, quantized, *_conds(rng), _latent(), 0, 2, 4.0, "euler",
                                           "normal", 1, config)
    assert not result.improved and "are kept" in text and "held-back sample" in text
    before = bridge.quantized_layers(quantized)
    assert all(m is before[n] for n, m in bridge.quantized_layers(out).items())
    assert out.model_options["octet"]["qat"]["kept_ptq"] is True


def test_heldback_prompts_decide_and_are_never_trained_on(tiny_model, rng, monkeypatch):
    """The teacher trajectories use the training prompts only; the verdict samples the held-back seed with the
    held-back prompts and the training prompts (float, PTQ and QAT model each)."""
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    positive, negative = _conds(rng)
    held = reference_model.tiny_conditioning(batch=2, seed=int(torch.randint(1 << 30, (1,), generator=rng)))
    calls, real = [], sampling.ksampler

    def spy(model, seed, steps, cfg, sampler_name, scheduler, pos, neg, latent):
        calls.append((seed, "held" if pos is held else "train" if pos is positive else "other"))
        return real(model, seed, steps, cfg, sampler_name, scheduler, pos, neg, latent)

    monkeypatch.setattr(sampling, "ksampler", spy)
    config = qat.QATConfig(steps=2, lr=1e-4, lora_rank=2, eval_calls=2)
    out, _, text = sampling.finetune(tiny_model, quantized, positive, negative, _latent(), 5, 2, 4.0, "euler",
                                     "normal", 2, config, heldback_positive=held)
    held_seed = 5 + sampling.HOLDOUT_SEED_OFFSET
    assert calls[:2] == [(5, "train"), (6, "train")]
    assert calls[2] == (held_seed, "held")  # the float reference whose calls are the per-call held-back set
    assert sorted(calls[3:]) == sorted([(held_seed, "train")] * 3 + [(held_seed, "held")] * 2)
    assert out.model_options["octet"]["qat"]["heldback_prompts"] is True and "held-back prompts" in text
