"""ComfyUI 0.29's dynamic VRAM (its default on NVIDIA): ``ModelPatcherDynamic`` stages the weights of every module
that has ``comfy_cast_weights`` through comfy-aimdo's virtual buffers, which only comfy.ops reads. Octet's layers
must load whole instead (else each call copies the int8 weight from the CPU), with LoRA merged as a full load
merges it, and hand their device memory back when the host restores its CPU weights.

On a CPU the host reroutes a dynamic patcher to ModelPatcher and comfy-aimdo's pinned host buffers need a GPU:
the tests build the dynamic patcher anyway (the loader's module classification and backups are the same code)
with a stand-in for the host buffers. Whether aimdo itself stages on a GPU is bench/workflow.py --dynamic-vram's."""
import pytest
import torch

from comfyui_octet.kernels import dispatch
from comfyui_octet.nodes import bridge, dynamic_vram, host_compat
from comfyui_octet.octet import config_for_mode, stream_ahead
from comfyui_octet.octet.modules import QuantLayer


@pytest.fixture
def dynamic(monkeypatch):
    """fresh tiny SD1.5 MODELs as ModelPatcherDynamic."""
    import comfy.model_patcher as mp
    if not hasattr(mp, "ModelPatcherDynamic"):
        pytest.skip("ComfyUI 0.3.75 has no dynamic VRAM")
    import comfy_aimdo.host_buffer

    from comfyui_octet.fixtures import reference_model

    class HostBuffer:        # pinned host memory needs a GPU; the loader only creates these here
        size = 0

        def __init__(self, *args, **kwargs):
            pass
    monkeypatch.setattr(comfy_aimdo.host_buffer, "HostBuffer", HostBuffer)
    monkeypatch.setattr(mp.ModelPatcherDynamic, "__new__", lambda cls, *a, **k: object.__new__(cls))
    # The host's partially_unload asserts a GPU; with no aimdo buffer to free (the CPU) it restores the backups.
    monkeypatch.setattr(mp.ModelPatcherDynamic, "partially_unload",
                        lambda self, device_to, memory_to_free=0, force_patch_weights=False: self.restore_loaded_backups())

    def make():
        legacy = reference_model.build_tiny_sd15()
        patcher = mp.ModelPatcherDynamic(legacy.model, legacy.load_device, legacy.offload_device)
        assert patcher.is_dynamic()
        return legacy, patcher
    return make


def _layers(patcher):
    return [m for m in patcher.model.diffusion_model.modules() if isinstance(m, QuantLayer)]


def _inputs():
    from comfyui_octet.fixtures import reference_model
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), reference_model.tiny_conditioning(seed=3)[0][0]


def _legacy_output(patcher):
    """The diffusion model's output with ``patcher`` fully loaded by the legacy ModelPatcher (LoRA merged)."""
    x, t, ctx = _inputs()
    patcher.patch_model(device_to=patcher.load_device)
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=ctx)
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


def _dynamic_output(patcher):
    """The same after the dynamic patcher's load (what load_models_gpu does for a dynamic MODEL)."""
    x, t, ctx = _inputs()
    patcher.partially_load(patcher.load_device)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, context=ctx)


def test_octet_layers_load_whole_under_dynamic_vram_and_compute_as_under_the_legacy_patcher(dynamic):
    legacy, patcher = dynamic()
    want = _legacy_output(bridge.quantize_model(legacy, config_for_mode("dynamic"))[0])
    quantized, result = bridge.quantize_model(patcher, config_for_mode("dynamic"))
    assert quantized.is_dynamic()
    got = _dynamic_output(quantized)
    layers = _layers(quantized)
    assert len(layers) == len(result.replacements) > 100
    # Not staged (staging marks a module with seed_key and casts it per call): backed up and loaded whole.
    assert not any(hasattr(m, "seed_key") or hasattr(m, "comfy_cast_weights") for m in layers)
    # Their CPU originals are held by the layers, not in the host's backups (shared by every clone of the model and
    # put back by path: into the float modules once the object patches are out).
    assert all(m.__dict__[dynamic_vram.ORIGINALS]["weight"].weight.device.type == "cpu" for m in layers)
    assert not any(".".join(k.split(".")[:-1]) in quantized.object_patches for k in quantized.backup)
    # while the host's own modules are staged as before
    assert any(hasattr(m, "seed_key") for m in quantized.model.diffusion_model.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _as_if_copied(patcher):
    """Make the originals of what the host loaded whole other tensors than the loaded ones, as on a GPU (where a
    load copies the CPU original over; on the CPU, ``Tensor.to`` hands back the original itself)."""
    def copy(t):
        return torch.nn.Parameter(t.detach().clone(), requires_grad=False) if isinstance(t, torch.nn.Parameter) \
            else t.clone()
    for key, bk in list(patcher.backup.items()):
        patcher.backup[key] = bk._replace(weight=copy(bk.weight))
    for key, buf in list(patcher.backup_buffers.items()):
        patcher.backup_buffers[key] = copy(buf)
    for m in _layers(patcher):
        held = m.__dict__.get(dynamic_vram.ORIGINALS, {})
        for name, entry in list(held.items()):
            held[name] = entry._replace(weight=copy(entry.weight)) if hasattr(entry, "_replace") else copy(entry)


def test_a_lora_on_an_octet_model_under_dynamic_vram_is_merged_as_a_full_load_merges_it(dynamic, rng):
    from test_lora import _apply, _lora
    legacy, patcher = dynamic()
    lora = _lora(legacy, rng)
    want = _legacy_output(_apply(bridge.quantize_model(legacy, config_for_mode("dynamic"))[0], lora))
    quantized = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    without = _dynamic_output(quantized)
    with_lora = _apply(quantized, lora)
    assert type(with_lora) is type(quantized)                  # the host's clone keeps Octet's loader
    got = _dynamic_output(with_lora)
    assert (got - without).abs().max() > 1e-2                  # the LoRA reached the int8 layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Every prompt loads again: the merged weights are kept, not merged twice; switching clones re-merges.
    for model, expected in ((with_lora, want), (quantized, without), (with_lora, want), (with_lora, want)):
        torch.testing.assert_close(_dynamic_output(model), expected, rtol=0, atol=0)


def test_a_second_prompts_load_keeps_the_loaded_tensors_and_their_plans(dynamic):
    _, patcher = dynamic()
    quantized, _ = bridge.quantize_model(patcher, config_for_mode("dynamic"))
    first = _dynamic_output(quantized)
    _as_if_copied(quantized)
    layers = _layers(quantized)
    loaded = [(m.weight, m.bias, dict(m._plans)) for m in layers]
    assert sum(bool(plans) for *_, plans in loaded) > 50
    originals = [m.__dict__[dynamic_vram.ORIGINALS]["weight"].weight for m in layers]
    memory = quantized.model.model_loaded_weight_memory
    norm = quantized.model.diffusion_model.out[0]            # a host module it loads whole (small: not staged)
    assert not isinstance(norm, QuantLayer) and "diffusion_model.out.0.weight" in quantized.backup
    norm_weight = norm.weight
    again = _dynamic_output(quantized)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert norm.weight is norm_weight                        # kept too: a captured graph's tensors stay put
    for m, (weight, bias, plans) in zip(layers, loaded):
        assert m.weight is weight and m.bias is bias             # not copied again, the same Parameter
        assert all(m._plans.get(k) is plan for k, plan in plans.items())   # not planned again
    assert all(m.__dict__[dynamic_vram.ORIGINALS]["weight"].weight is o for m, o in zip(layers, originals))
    assert quantized.model.model_loaded_weight_memory == memory            # still counted by the host
    quantized.partially_unload(quantized.offload_device, 1e32)   # the host's unload under memory pressure
    assert all(m.weight.data_ptr() == o.data_ptr() for m, o in zip(layers, originals))
    assert not any(m._plans or m._operands for m in layers)     # nothing holds the loaded tensors


def test_after_an_octet_model_the_float_model_of_the_same_base_computes_as_before(dynamic):
    """Clones share the host's backups and it restores them by path: an Octet layer's int8 original once went
    into the float Linear at that path (the base model's output then changed by 0.15 of 0.12)."""
    import comfy.model_management as mm
    _, patcher = dynamic()
    x, t, ctx = _inputs()
    quantized = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    layers = [m for m in quantized.object_patches.values() if isinstance(m, QuantLayer)]
    outputs = {}
    for name, model in (("float", patcher), ("int8", quantized), ("float", patcher), ("int8", quantized),
                        ("float", patcher)):
        mm.load_models_gpu([model])
        if name == "float":
            # Loaded in the Octet model's place: the layers it does not run hold nothing loaded (no plan, the
            # originals back), as after an unload; the host no longer counts them.
            assert not any(m._plans or m._operands or m.__dict__.get(dynamic_vram.ORIGINALS) for m in layers)
        with torch.no_grad():
            outputs.setdefault(name, []).append(model.model.diffusion_model(x, t, context=ctx))
        if name == "int8":
            assert any(m._plans for m in layers)
            _as_if_copied(quantized)
    assert float((outputs["float"][0] - outputs["int8"][0]).abs().max()) > 1e-3
    for runs in outputs.values():
        for out in runs[1:]:
            torch.testing.assert_close(out, runs[0], rtol=0, atol=0)
    mm.unload_all_models()       # the Octet model's full unload, then the float one's: the float modules intact
    assert not any(isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.int8
                   for m in patcher.model.diffusion_model.modules() if not isinstance(m, QuantLayer)
                   and isinstance(getattr(m, "weight", None), torch.Tensor))
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        torch.testing.assert_close(patcher.model.diffusion_model(x, t, context=ctx), outputs["float"][0], rtol=0, atol=0)


def test_the_next_prompts_load_and_a_clone_with_other_options_keep_the_loaded_layers(dynamic):
    """load_models_gpu detaches the model it loads (itself, at every prompt) and a clone it loads in its place:
    neither frees the layers they both run (a new sampling option on a model clones its patcher)."""
    import comfy.model_management as mm
    _, patcher = dynamic()
    x, t, ctx = _inputs()
    quantized = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    mm.load_models_gpu([quantized])
    layers = _layers(quantized)
    with torch.no_grad():
        first = quantized.model.diffusion_model(x, t, context=ctx)
    planned = [dict(m._plans) for m in layers]
    assert sum(map(bool, planned)) > 50
    other = quantized.clone()
    other.model_options["transformer_options"]["octet_test_option"] = 1
    for model in (quantized, other, other, quantized):
        mm.load_models_gpu([model])
        with torch.no_grad():
            torch.testing.assert_close(model.model.diffusion_model(x, t, context=ctx), first, rtol=0, atol=0)
        for m, plans in zip(layers, planned):
            assert all(m._plans.get(k) is plan for k, plan in plans.items())   # not freed, not planned again


def test_two_octet_models_of_one_base_alternate(dynamic):
    """Different layers at some paths (convs quantized or not): each model keeps computing as itself."""
    import comfy.model_management as mm
    _, patcher = dynamic()
    x, t, ctx = _inputs()
    a = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    b = bridge.quantize_model(patcher, config_for_mode("weight_only", kinds=("linear",)))[0]
    outputs = {}
    for name, model in (("a", a), ("b", b), ("a", a), ("b", b)):
        mm.load_models_gpu([model])
        with torch.no_grad():
            outputs.setdefault(name, []).append(model.model.diffusion_model(x, t, context=ctx))
    for runs in outputs.values():
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


def test_the_hosts_unload_leaves_no_plan_holding_the_loaded_tensors(dynamic):
    _, patcher = dynamic()
    quantized, _ = bridge.quantize_model(patcher, config_for_mode("dynamic"))
    _dynamic_output(quantized)
    _as_if_copied(quantized)
    layers = _layers(quantized)
    assert any(m._plans for m in layers)
    quantized.unpatch_model(quantized.offload_device, unpatch_weights=True)   # the host's full unload
    assert not any(m._plans or m._operands for m in layers)
    assert not any(dynamic_vram.ORIGINALS in m.__dict__ and m.__dict__[dynamic_vram.ORIGINALS] for m in layers)


@pytest.fixture
def real_dynamic(monkeypatch):
    """comfy-aimdo itself on a GPU, as 0.29's main.py starts it (undone after the test): (cuda, cpu, x, t, ctx) with
    the inputs on the GPU."""
    import comfy.memory_management
    import comfy.model_patcher as mp
    if not hasattr(mp, "ModelPatcherDynamic"):
        pytest.skip("ComfyUI 0.3.75 has no dynamic VRAM")
    monkeypatch.setattr(mp, "CoreModelPatcher", mp.CoreModelPatcher)
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", comfy.memory_management.aimdo_enabled)
    assert host_compat.enable_dynamic_vram() == "on"
    cuda, cpu = torch.device("cuda", torch.cuda.current_device()), torch.device("cpu")   # as the host names it
    x, t, ctx = (v.to(cuda) for v in _inputs())
    return cuda, cpu, x, t, ctx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="comfy-aimdo stages weights on a GPU")
def test_gpu_octet_with_a_lora_under_real_dynamic_vram_computes_as_under_the_legacy_patcher(real_dynamic, rng):
    """The same as above with comfy-aimdo itself (its virtual buffers and pinned host memory), on a GPU:
    three prompts' loads, then the unload."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    from test_lora import _apply, _lora

    from comfyui_octet.fixtures import reference_model
    cuda, cpu, x, t, ctx = real_dynamic

    def build():
        legacy = reference_model.build_tiny_sd15()
        return legacy, mp.ModelPatcherDynamic(legacy.model, cuda, cpu)

    def legacy_output(patcher):
        patcher.load_device = cuda
        patcher.patch_model(device_to=cuda)
        patcher.model.to(cuda)
        try:
            with torch.no_grad():
                return patcher.model.diffusion_model(x, t, context=ctx)
        finally:
            patcher.unpatch_model(device_to=cpu)

    legacy, _ = build()
    lora = _lora(legacy, rng)
    plain = legacy_output(bridge.quantize_model(legacy, config_for_mode("dynamic"))[0])
    expected = legacy_output(_apply(bridge.quantize_model(legacy, config_for_mode("dynamic"))[0], lora))
    effect = float((expected - plain).abs().max())

    _, patcher = build()
    quantized = _apply(bridge.quantize_model(patcher, config_for_mode("dynamic"))[0], lora)
    assert quantized.is_dynamic()
    layers = _layers(quantized)
    loaded, outputs = None, []
    for _ in range(3):      # three prompts: the later loads keep the loaded tensors (no copy, same storage)
        mm.load_models_gpu([quantized])
        assert all(m.weight.device.type == "cuda" for m in layers)
        pointers = [m.weight.data_ptr() for m in layers]
        assert loaded is None or pointers == loaded
        loaded = pointers
        with torch.no_grad():
            outputs.append(quantized.model.diffusion_model(x, t, context=ctx))
            outputs.append(quantized.model.diffusion_model(x, t, context=ctx))
    # Later prompts compute as the first prompt's later steps: the loads keep the merged weights and their plans.
    # (The very first call of this fresh fp32 model with a LoRA differs from its later ones by ~1e-4 of 0.1 on an
    # H200, 2026-12-04: a first-call effect of the layers, not of the loads, which all compute alike; open.)
    for got in outputs[2:]:
        torch.testing.assert_close(got, outputs[1], rtol=0, atol=0)
    # The LoRA merged as the legacy patcher merges it, up to where each rounds the re-quantized weight (the
    # legacy load merges into the CPU weight, the dynamic one into the loaded GPU copy): H200 1.2e-4 vs 0.12.
    diff = float((outputs[0] - expected).abs().max())
    assert effect > 1e-2 and diff < 0.01 * effect, (diff, effect)
    mm.free_memory(1e30, cuda)      # what the host does to make room (unload_all_models frees its own device)
    assert all(m.weight.device.type == "cpu" for m in layers)
    assert not any(m._plans or m._operands for m in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="comfy-aimdo stages weights on a GPU")
def test_gpu_the_float_model_loaded_in_the_octet_models_place_computes_as_before_and_frees_the_layers(real_dynamic):
    """Real comfy-aimdo on a GPU: float, INT8, float, INT8 of one checkpoint through load_models_gpu. The float
    MODEL computes as it did before the INT8 one ran (the host's backups by path once put int8 originals into
    it), and while it runs the INT8 layers hold no GPU memory (the host no longer counts them)."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from comfyui_octet.fixtures import reference_model
    cuda, cpu, x, t, ctx = real_dynamic
    legacy = reference_model.build_tiny_sd15()
    patcher = mp.ModelPatcherDynamic(legacy.model, cuda, cpu)
    quantized = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    layers = [m for m in quantized.object_patches.values() if isinstance(m, QuantLayer)]
    outputs = {}
    for name, model in (("float", patcher), ("int8", quantized), ("float", patcher), ("int8", quantized),
                        ("int8", quantized), ("float", patcher)):
        mm.load_models_gpu([model])
        on_gpu = [m for m in layers if any(p.device.type == "cuda" for p in (*m.parameters(), *m.buffers()))]
        assert (not on_gpu) if name == "float" else (len(on_gpu) == len(layers)), (name, len(on_gpu))
        if name == "float":
            assert not any(m._plans or m._operands for m in layers)
        with torch.no_grad():
            outputs.setdefault(name, []).append(model.model.diffusion_model(x, t, context=ctx))
    assert float((outputs["float"][0] - outputs["int8"][0]).abs().max()) > 1e-3
    for out in outputs["float"][1:]:
        torch.testing.assert_close(out, outputs["float"][0], rtol=0, atol=0)
    for out in outputs["int8"][1:]:     # up to the first-call difference of the test above (~1e-4 of 0.1)
        torch.testing.assert_close(out, outputs["int8"][0], rtol=0, atol=1e-3)
    mm.free_memory(1e30, cuda)


def test_an_int8_model_that_does_not_fit_streams_its_largest_layers_and_loads_them_whole_when_it_can(
        dynamic, monkeypatch, caplog):
    """Octet's layers load whole; with less free VRAM than they need (beside ComfyUI's reserve) the largest stream
    instead, as the host streams a bf16 model, rather than running out of memory (SDXL with 2.5 GiB free on an
    H200, 2026-12-04: bf16 ran, INT8 did not). A later load with room loads them whole again."""
    import logging

    import comfy.model_management as mm
    _, patcher = dynamic()
    x, t, ctx = _inputs()
    quantized = bridge.quantize_model(patcher, config_for_mode("dynamic"))[0]
    layers = [m for m in quantized.object_patches.values() if isinstance(m, QuantLayer)]
    sizes = {m: sum(p.numel() * p.element_size() for p in (*m.parameters(), *m.buffers())) for m in layers}
    total = sum(sizes.values())
    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: None)
    mm.load_models_gpu([quantized])
    with torch.no_grad():
        want = quantized.model.diffusion_model(x, t, context=ctx)
    mm.unload_all_models()
    assert not any("weight" in m.__dict__.get(dynamic_vram.ORIGINALS, {}) for m in layers)

    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: total // 2)
    monkeypatch.setattr(dynamic_vram, "_STREAM_MIN_BYTES", 0)      # the tiny model's layers are all small
    monkeypatch.setattr(dynamic_vram, "_said", set())               # the first in this process: a warning
    with caplog.at_level(logging.WARNING, logger="octet"):
        mm.load_models_gpu([quantized])
    whole = [m for m in layers if "weight" in m.__dict__.get(dynamic_vram.ORIGINALS, {})]
    streamed = [m for m in layers if m not in whole]
    assert streamed and whole
    assert sum(sizes[m] for m in whole) <= total // 2 < sum(sizes[m] for m in whole) + max(sizes[m] for m in streamed)
    assert min(sizes[m] for m in streamed) >= max(sizes[m] for m in whole)     # the largest stream
    assert all(hasattr(m, "seed_key") for m in streamed)        # staged by the host: it leaves them in RAM
    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: 0)   # the whole ones took it
    with caplog.at_level(logging.WARNING, logger="octet"):
        mm.load_models_gpu([quantized])                             # the next prompt: the same layers, not said again
    assert [m for m in layers if "weight" in m.__dict__.get(dynamic_vram.ORIGINALS, {})] == whole
    assert len([r for r in caplog.records if "stay in RAM and are copied to the GPU at each call" in r.getMessage()]) == 1
    with torch.no_grad():
        torch.testing.assert_close(quantized.model.diffusion_model(x, t, context=ctx), want, rtol=0, atol=0)

    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: None)    # room again (other models unloaded)
    mm.load_models_gpu([quantized])
    assert all("weight" in m.__dict__.get(dynamic_vram.ORIGINALS, {}) for m in layers)     # all whole now
    assert all(m.__dict__["_comfy_cast"] is None for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model.diffusion_model(x, t, context=ctx), want, rtol=0, atol=0)


def test_the_layer_budget_counts_what_aimdo_holds_for_dynamic_models_as_free(monkeypatch):
    """comfy-aimdo gives back the VRAM of dynamic models' staged weights when an allocation needs it (the host
    does not unload dynamic models for each other): the loading clone's (the float one's, which the INT8 layers
    replace) and the loaded models' on that device count, each once; the reserve is kernels/vram.py's."""
    from types import SimpleNamespace

    import comfy.model_management as mm

    from comfyui_octet.kernels import vram
    cuda = torch.device("cuda", 0)

    def patcher(resident, device=cuda):
        vbar = SimpleNamespace(loaded_size=lambda: resident)
        return SimpleNamespace(load_device=device, _vbar_get=lambda: vbar)
    ours, other, elsewhere = patcher(3 << 30), patcher(2 << 30), patcher(5 << 30, torch.device("cuda", 1))
    monkeypatch.setattr(mm, "current_loaded_models", [SimpleNamespace(model=m) for m in (ours, other, elsewhere)])
    monkeypatch.setattr(dynamic_vram, "_LOADING", [ours])
    assert dynamic_vram.aimdo_resident(cuda) == (3 << 30) + (2 << 30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"reserved_bytes.all.current": 7 << 20,
                                                                    "active_bytes.all.current": 3 << 20})
    monkeypatch.setattr(vram, "RECLAIMABLE", [dynamic_vram.aimdo_resident])
    monkeypatch.setattr(vram, "reserve", lambda device: 1 << 29)
    assert dynamic_vram._layer_budget(cuda) == (1 << 30) + (4 << 20) + (3 << 30) + (2 << 30) - (1 << 29)
    assert dynamic_vram._layer_budget(torch.device("cpu")) is None


def test_the_reserve_is_what_comfyui_kept_for_the_prompt_at_its_last_load(monkeypatch):
    """load_models_gpu gives a model's partially_load the VRAM its weights may take: what is free less its
    reserve for the prompt (the activation estimate), which the dynamic patcher itself drops. That reserve is what
    Octet's own allocations leave free; a full load (1e32) or a CPU leaves ComfyUI's minimum."""
    import comfy.model_management as mm

    from comfyui_octet.kernels import vram

    class Host:
        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            return extra_memory

    patcher = Host()
    host_compat.mix_in(patcher, dynamic_vram.KeepsLoadedLayers)
    cuda = torch.device("cuda", 0)
    minimum = int(mm.minimum_inference_memory())
    monkeypatch.setattr(host_compat, "PROMPT_RESERVE", {})
    monkeypatch.setattr(mm, "get_free_memory", lambda device: 10 << 30)
    assert host_compat.inference_reserve in vram.HOST_RESERVE        # registered by the pack
    assert vram.reserve(cuda) == minimum
    assert patcher.partially_load(cuda, (10 << 30) - (3 << 30)) == (7 << 30)     # passed on as it came
    assert vram.reserve(cuda) == 3 << 30 and vram.reserve(torch.device("cuda", 1)) == minimum
    patcher.partially_load(cuda, 1e32)
    assert vram.reserve(cuda) == minimum
    patcher.partially_load(cuda, (10 << 30) - (minimum >> 1))       # below ComfyUI's minimum: the minimum
    assert vram.reserve(cuda) == minimum
    monkeypatch.setattr(vram, "FLOOR_BYTES", 20 << 30)              # OCTET_VRAM_RESERVE_MIB
    assert vram.reserve(cuda) == 20 << 30


def test_an_int8_model_on_the_legacy_patcher_records_the_prompts_reserve_too(monkeypatch):
    """ComfyUI 0.3.75, or 0.29 with --disable-dynamic-vram: the host's own ModelPatcher loads the INT8 model; its
    partially_load gets the same budget, and the clones other nodes make (a LoRA loader's) keep recording it."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from comfyui_octet.fixtures import reference_model
    from comfyui_octet.kernels import vram
    legacy = reference_model.build_tiny_sd15()
    assert type(legacy) is mp.ModelPatcher
    quantized = bridge.quantize_model(legacy, config_for_mode("dynamic"))[0]
    clone = quantized.clone()
    assert isinstance(clone, host_compat.RecordsInferenceReserve) and isinstance(clone, mp.ModelPatcher)
    assert not isinstance(legacy, host_compat.RecordsInferenceReserve)        # the input MODEL is not changed
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(host_compat, "PROMPT_RESERVE", {})
    monkeypatch.setattr(mm, "get_free_memory", lambda device: 10 << 30)
    monkeypatch.setattr(mp.ModelPatcher, "partially_load", lambda self, device_to, extra_memory=0, **kw: 0)
    clone.partially_load(cuda, 4 << 30)
    assert vram.reserve(cuda) == 6 << 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="comfy-aimdo stages weights on a GPU")
def test_gpu_layers_that_do_not_fit_stream_from_ram_with_real_aimdo_and_compute_as_loaded_whole(real_dynamic, monkeypatch):
    """Real comfy-aimdo: with a budget of half the INT8 layers, the largest stay in RAM (staged by the host), the
    model computes as when it is loaded whole, and a later load with room loads them whole again."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from comfyui_octet.fixtures import reference_model
    cuda, cpu, x, t, ctx = real_dynamic
    legacy = reference_model.build_tiny_sd15()
    quantized = bridge.quantize_model(mp.ModelPatcherDynamic(legacy.model, cuda, cpu), config_for_mode("dynamic"))[0]
    layers = [m for m in quantized.object_patches.values() if isinstance(m, QuantLayer)]
    total = sum(p.numel() * p.element_size() for m in layers for p in (*m.parameters(), *m.buffers()))
    mm.load_models_gpu([quantized])
    with torch.no_grad():
        quantized.model.diffusion_model(x, t, context=ctx)          # the first call of a fresh model (see above)
        want = quantized.model.diffusion_model(x, t, context=ctx)
    mm.free_memory(1e30, cuda)
    monkeypatch.setattr(dynamic_vram, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: total // 2)
    mm.load_models_gpu([quantized])
    streamed = [m for m in layers if m.weight.device.type == "cpu"]
    assert streamed and len(streamed) < len(layers)
    assert all(hasattr(m, "_v") for m in streamed if m.weight.numel() > 16 * 1024)   # staged by aimdo
    with torch.no_grad():
        torch.testing.assert_close(quantized.model.diffusion_model(x, t, context=ctx), want, rtol=0, atol=1e-3)
    assert all(m.weight.is_pinned() for m in streamed)          # copied at each call from pinned RAM
    ahead, missed = stream_ahead.stats["ahead"], stream_ahead.stats["missed"]
    with torch.no_grad():                                       # the order learnt: copies made one call ahead
        torch.testing.assert_close(quantized.model.diffusion_model(x, t, context=ctx), want, rtol=0, atol=1e-3)
    assert stream_ahead.stats["ahead"] > ahead and stream_ahead.stats["missed"] == missed    # the same order
    torch.cuda.synchronize()
    before, plans = torch.cuda.memory_allocated(), dispatch.plans_made()
    with torch.no_grad():
        quantized.model.diffusion_model(x, t, context=ctx)
    # No streamed layer's copy outlives its call: one copy ahead (the next step's first) before and after.
    assert torch.cuda.memory_allocated() == before
    assert dispatch.plans_made() == plans       # the streamed calls' plans leave the deferrals' kept answers valid
    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: None)
    mm.load_models_gpu([quantized])
    assert all(m.weight.device.type == "cuda" and not hasattr(m, "_v") for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model.diffusion_model(x, t, context=ctx), want, rtol=0, atol=1e-3)
    mm.free_memory(1e30, cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="comfy-aimdo stages weights on a GPU")
def test_gpu_int8_layers_streamed_from_pinned_ram_replay_from_a_cuda_graph_as_they_run_eager(real_dynamic, monkeypatch):
    """The streamed layers' per-call copies come from pinned RAM at fixed addresses: a captured graph of the
    forward replays them, and gives what the same forward gives eager (planned for a graph in both)."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from comfyui_octet.fixtures import reference_model
    from comfyui_octet.kernels.dispatch import graph_plans
    from comfyui_octet.octet.cuda_graph import GraphBackend, capture, flatten
    cuda, cpu, x, t, ctx = real_dynamic
    legacy = reference_model.build_tiny_sd15()
    quantized = bridge.quantize_model(mp.ModelPatcherDynamic(legacy.model, cuda, cpu), config_for_mode("dynamic"))[0]
    layers = [m for m in quantized.object_patches.values() if isinstance(m, QuantLayer)]
    total = sum(p.numel() * p.element_size() for m in layers for p in (*m.parameters(), *m.buffers()))
    monkeypatch.setattr(dynamic_vram, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(dynamic_vram, "_layer_budget", lambda device, patcher=None: total // 2)
    mm.load_models_gpu([quantized])
    streamed = [m for m in layers if m.weight.device.type == "cpu"]
    # The host stages weight and bias (left in RAM here, pinned), and loads the rest (the scales) onto the GPU.
    in_ram = [t for m in streamed for t in (*m.parameters(), *m.buffers()) if t.device.type == "cpu"]
    assert streamed and all(t.is_pinned() for t in in_ram)
    dm = quantized.model.diffusion_model
    with torch.no_grad(), graph_plans():
        dm(x, t, context=ctx)                                       # the first call of a fresh model (see above)
        want = dm(x, t, context=ctx)
    leaves, spec = flatten((x, t, ctx))
    with torch.no_grad():
        graph = capture(lambda a: dm(a[0], a[1], context=a[2]), leaves, spec, cuda, GraphBackend())
        got = graph.run(leaves)
        got_again = graph.run(leaves)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_again, want, rtol=0, atol=0)
    del graph
    mm.free_memory(1e30, cuda)



def test_a_cuda_device_without_an_index_is_the_current_one_for_the_reserve_and_the_loaded_layers(monkeypatch):
    """The host names a device "cuda" in places and "cuda:N" in others: both readings (the reserve's key, the kept
    layers' device check) take an index-less CUDA device as the current one, as torch does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert host_compat.device_key(cuda) == host_compat.device_key("cuda:1") == ("cuda", 1)
    assert host_compat.device_key("cpu") == ("cpu", 0)
    assert dynamic_vram._same_device(cuda, cuda1) and dynamic_vram._same_device(cuda1, cuda)
    assert not dynamic_vram._same_device(cuda, cuda0) and not dynamic_vram._same_device(cuda, torch.device("cpu"))
