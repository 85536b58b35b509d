"""CUDA Graph Step on the real host: keys, LRU bound, invalidation, every eager fallback and its log line.

On a CPU, graph capture is replaced by ``CpuGraphs``, a stand-in for torch.cuda's graph API behind
the one seam (octet.cuda_graph.GraphBackend): 'capture' keeps the function and its output
tensors, 'replay' runs the function again on the static input buffers and writes into those same
output tensors. So a replay only equals eager if every call's inputs really were copied into the
static buffers; what the stand-in cannot show (stale weight addresses, a group index baked into a
graph) is asserted through the bookkeeping. The bit-identity of real graphs is the GPU test at
the end (skipped without CUDA).

Passes on ComfyUI 0.3.75 (the venv's host) and 0.29 (COMFYUI_PATH=<unpacked comfyui-0.29.0.tgz>,
with comfy-aimdo==0.4.10 importable).
"""
import logging

import pytest
import torch
from torch.utils import _pytree as pytree

from comfyui_octet.nodes import bridge, graph_step

from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import StaticW8A8Config, config_for_mode
from comfyui_octet.octet.cuda_graph import GraphBackend, GraphCache

STEPS = 4
SIZE = 8


class CpuGraphs(GraphBackend):
    def __init__(self, fail: bool = False, free: int = 1 << 40, peak: int = None):
        self.fail, self.captured, self.warmups, self.reserved, self.free = fail, 0, 0, 0, free
        self.peak = peak        # what the warm-up says it allocated at most (None: it does not say)

    def supports(self, device):
        return True

    def warmup(self, fn, device, runs):
        for _ in range(runs):
            self.warmups += 1
            fn()
        return self.peak

    def capture(self, fn, device):
        self.captured += 1
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        out = fn()
        self.reserved += 3 << 20
        return _Replay(fn, out), out

    def memory(self, device):
        return self.reserved

    def free_memory(self, device):
        return self.free


class _Replay:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        for dst, src in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(self.fn())):
            dst.copy_(src)


def _records(caplog, text):
    return [r for r in caplog.records if "CUDA Graph Step" in r.getMessage() and text in r.getMessage()]


@pytest.fixture
def graphs():
    return CpuGraphs()


@pytest.fixture
def cpu_sample(sample):
    def run(model, **kw):
        kw.setdefault("steps", STEPS)
        kw.setdefault("size", SIZE)
        return sample(model, **kw)
    return run


def test_on_cpu_sampling_equals_eager_and_says_why_once(tiny_model, cpu_sample, caplog):
    """The node as a user gets it on a CPU: no graphs, the same samples, one line saying why."""
    from comfyui_octet.nodes.graph_step_nodes import CudaGraphStep
    out = CudaGraphStep.execute(tiny_model, 4, 2)
    model, report = out.args
    assert "sampling will run eager" in report
    step = graph_step.graph_step_of(model)
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model), cpu_sample(tiny_model), rtol=0, atol=0)
        cpu_sample(model, seed=3)
    assert len(_records(caplog, "runs on cpu: CUDA graphs need a CUDA device")) == 1
    assert step.stats["eager"] == 2 * STEPS and step.stats["captures"] == 0 and not step.cache.graphs


def test_replays_equal_eager_one_graph_per_signature(tiny_model, cpu_sample, graphs, caplog):
    model, step = graph_step.install(tiny_model, backend=graphs)
    eager = cpu_sample(tiny_model, seed=5)
    larger = cpu_sample(tiny_model, size=SIZE + 4)   # first: loading the float clone would drop model's graphs
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model, seed=5), eager, rtol=0, atol=0)
    # cond and uncond go through as one batch every step: one signature, captured once.
    assert step.stats == {"replays": STEPS, "captures": 1, "eager": 0, "invalidations": 0}
    assert graphs.warmups == 2
    assert len(_records(caplog, "captured graph 1 (cache 1/4)")) == 1 and "memory 3.0 MiB" in caplog.text

    cpu_sample(model, seed=6)                        # same shapes, other values: reused
    assert step.stats["captures"] == 1 and step.stats["replays"] == 2 * STEPS
    torch.testing.assert_close(cpu_sample(model, size=SIZE + 4), larger, rtol=0, atol=0)
    assert step.stats["captures"] == 2               # another latent size: another graph
    cpu_sample(model, cfg=1.0)                       # cfg 1: no uncond batch -> cond_or_uncond [0]
    assert step.stats["captures"] == 3
    keys = list(step.cache.graphs)
    assert len(set(keys)) == 3
    # memory per graph: the stand-in's 3 MiB "pool" plus the static input buffers
    assert all(3 << 20 < g.bytes < 4 << 20 for g in step.cache.graphs.values())
    assert "3/4 graphs cached" in step.report()


def test_conditioning_shape_is_part_of_the_key(tiny_model, cpu_sample, graphs):
    model, step = graph_step.install(tiny_model, backend=graphs)
    import nodes
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    for tokens in (8, 8, 12):
        pos = reference_model.tiny_conditioning(tokens=tokens, seed=1)
        neg = reference_model.tiny_conditioning(tokens=tokens, seed=2)
        nodes.common_ksampler(model, 1, STEPS, 4.0, "euler", "normal", pos, neg, latent)
    assert step.stats["captures"] == 2 and step.stats["replays"] == 3 * STEPS


def test_cache_is_bounded_lru(tiny_model, cpu_sample, graphs):
    model, step = graph_step.install(tiny_model, capacity=2, backend=graphs)
    for size in (SIZE, SIZE + 4, SIZE, SIZE + 8):   # SIZE is used again, so SIZE+4 is the oldest
        cpu_sample(model, size=size)
    assert step.stats["captures"] == 3 and step.cache.evictions == 1 and len(step.cache.graphs) == 2
    shapes = [k[0][0][1] for k in step.cache.graphs]  # first leaf: the latent's shape
    assert [s[-1] for s in shapes] == [SIZE, SIZE + 8]
    with pytest.raises(ValueError, match="capacity"):
        GraphCache(0)


def test_lora_on_and_off_drops_the_graphs(tiny_model, cpu_sample, graphs, caplog, rng):
    from test_lora import _apply, _lora
    model, step = graph_step.install(tiny_model, backend=graphs)
    lora = _lora(tiny_model, rng)
    plain = cpu_sample(tiny_model)
    with_lora = cpu_sample(_apply(tiny_model, lora))
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model), plain, rtol=0, atol=0)
        lora_model = _apply(model, lora)        # kept alive: a collected clone hands its load to its parent
        torch.testing.assert_close(cpu_sample(lora_model), with_lora, rtol=0, atol=0)           # LoRA on
        torch.testing.assert_close(cpu_sample(model), plain, rtol=0, atol=0)                    # and off
    # Each switch loads another clone in the other's place: the host detaches the one it replaces, whose graphs
    # go then (before, the weight check dropped them at its next call: "weights changed").
    assert step.stats["invalidations"] == 0 and step.stats["captures"] == 3
    assert len(_records(caplog, "another clone of the model is loaded in its place: 1 graph(s) dropped")) == 2


def test_moved_weights_drop_the_graphs(tiny_model, graphs):
    """Same patcher, same patches, but the weights were reloaded elsewhere: the data pointers tell."""
    model, step = graph_step.install(tiny_model, backend=graphs)
    x, t, ctx = _inputs()
    _call(model, x, t, ctx)
    dm = model.model.diffusion_model
    param = dm.out[2].weight
    old = param.data
    try:
        param.data = old.clone()
        _call(model, x, t, ctx)
    finally:
        param.data = old
    assert step.stats["invalidations"] == 1 and step.stats["captures"] == 2


def test_static_timestep_groups_are_graph_keys(tiny_model, graphs):
    """Each static layer reads the scale of the current sigma group; a graph would bake one in."""
    from test_calibration_nodes import SETTINGS, _conds
    from comfyui_octet.nodes import calibrate_nodes
    import nodes
    pos, neg = _conds()
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    cal, _ = calibrate_nodes.calibrate(tiny_model, pos, neg, latent, 7, 6, 4.0, "euler", "normal", 3)
    static, _ = bridge.quantize_model(tiny_model, StaticW8A8Config(**SETTINGS), calibration=cal)
    model, step = graph_step.install(static, backend=graphs)
    eager = nodes.common_ksampler(static, 7, 6, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    out = nodes.common_ksampler(model, 7, 6, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert step.stats["captures"] == 3 and step.stats["replays"] == 6   # 3 groups, 2 steps each
    assert sorted(k[3] for k in step.cache.graphs) == [(0,), (1,), (2,)]


def test_quantized_model_and_int8_sampler_timer_run_around_the_graph(tiny_model, graphs):
    """INT8 Sampler stacks its timer wrapper after ours; it still runs once per call, outside the graph."""
    from comfyui_octet.nodes import sampling
    q, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    model, step = graph_step.install(q, backend=graphs)
    timer = sampling.StepTimer()
    timed = timer.wrap(model, "int8")
    pos, neg = reference_model.tiny_conditioning(seed=1), reference_model.tiny_conditioning(seed=2)
    import nodes
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    out = nodes.common_ksampler(timed, 2, STEPS, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    eager = nodes.common_ksampler(q, 2, STEPS, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert len(timer.calls) == STEPS and step.stats["replays"] == STEPS and step.stats["captures"] == 1


# -- eager fallbacks through the sampler ---------------------------------------------------------
def _fallback_case(tiny_model, cpu_sample, caplog, graphs, change, expected):
    model, step = graph_step.install(tiny_model, backend=graphs)
    model = change(model)
    with caplog.at_level(logging.INFO, logger="octet"):
        out = cpu_sample(model)
        cpu_sample(model)
    assert len(_records(caplog, expected)) == 1, caplog.text
    assert step.stats["captures"] == 0 and step.stats["eager"] == 2 * STEPS
    return out


def test_unknown_diffusion_model_wrapper_runs_eager(tiny_model, cpu_sample, caplog, graphs):
    def add(m):
        m = m.clone()
        m.add_wrapper_with_key("diffusion_model", "other_pack", lambda executor, *a, **k: executor(*a, **k))
        return m
    out = _fallback_case(tiny_model, cpu_sample, caplog, graphs, add, "diffusion_model wrapper(s) ['other_pack']")
    torch.testing.assert_close(out, cpu_sample(tiny_model), rtol=0, atol=0)


def test_attention_patch_runs_eager(tiny_model, cpu_sample, caplog, graphs):
    def add(m):
        m = m.clone()
        m.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k, v))
        return m
    _fallback_case(tiny_model, cpu_sample, caplog, graphs, add, "transformer_options['patches'] ['attn1_patch']")


def test_unknown_object_patch_runs_eager(tiny_model, cpu_sample, caplog, graphs):
    def add(m):
        m = m.clone()
        conv = m.model.diffusion_model.out[2]
        twin = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        twin.load_state_dict(conv.state_dict())
        m.add_object_patch("diffusion_model.out.2", twin)
        return m
    _fallback_case(tiny_model, cpu_sample, caplog, graphs, add, "object patch 'diffusion_model.out.2' (Conv2d)")


def test_a_swapped_buffer_is_graph_safe_and_a_foreign_module_is_not():
    # Octet's memory goal swaps SD3's position table for int8 codes (octet/tables.py): read by address.
    from comfyui_octet.octet import tables
    assert graph_step._safe_object_patch("diffusion_model.pos_embed", torch.zeros(4, 8, dtype=torch.int8))
    crop = tables.PositionCrop(torch.nn.Linear(1, 1), torch.ones(4, 1), torch.bfloat16)
    assert graph_step._safe_object_patch("diffusion_model.cropped_pos_embed", crop)
    assert not graph_step._safe_object_patch("diffusion_model.out.2", torch.nn.Conv2d(1, 1, 1))


def test_capture_error_runs_that_key_eager_for_good(tiny_model, cpu_sample, caplog):
    failing = CpuGraphs(fail=True)
    model, step = graph_step.install(tiny_model, backend=failing)
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model), cpu_sample(tiny_model), rtol=0, atol=0)
        cpu_sample(model)
    # a plain capture, then one with the device as default device; both fail: eager for good, said once
    assert failing.captured == 2 and step.stats["eager"] == 2 * STEPS
    assert len(_records(caplog, "capture failed (RuntimeError: CUDA error: operation not permitted")) == 1


class WarmupFails(CpuGraphs):
    def warmup(self, fn, device, runs):
        self.warmups += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_failed_warm_up_is_not_tried_again(tiny_model, cpu_sample, caplog):
    """Only a refused capture is retried (with the device as default device): a warm-up that fails (out of
    memory) would fail again, at the cost of more forward passes."""
    failing = WarmupFails()
    model, step = graph_step.install(tiny_model, backend=failing)
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model), cpu_sample(tiny_model), rtol=0, atol=0)
    assert failing.warmups == 1 and failing.captured == 0 and step.stats["eager"] == STEPS
    assert len(_records(caplog, "capture failed (OutOfMemoryError: CUDA out of memory")) == 1


def _default_device_active() -> bool:
    return any(isinstance(m, torch.utils._device.DeviceContext)
               for m in torch.overrides._get_current_function_mode_stack())


class HostFactoryGraphs(CpuGraphs):
    """A capture that fails the way Wan's does (a host tensor copied in the forward) unless the device
    is torch's default device for the warm-up and the capture."""
    def __init__(self):
        super().__init__()
        self.contexts = []

    def warmup(self, fn, device, runs):
        self.contexts.append(("warmup", _default_device_active()))
        super().warmup(fn, device, runs)

    def capture(self, fn, device):
        self.contexts.append(("capture", _default_device_active()))
        self.fail = not _default_device_active()
        return super().capture(fn, device)


def test_capture_that_copies_a_host_tensor_is_retried_with_the_device_as_default(tiny_model, cpu_sample, caplog):
    graphs = HostFactoryGraphs()
    model, step = graph_step.install(tiny_model, backend=graphs)
    with caplog.at_level(logging.INFO, logger="octet"):
        out = cpu_sample(model)
        cpu_sample(model)
    torch.testing.assert_close(out, cpu_sample(tiny_model), rtol=0, atol=0)
    assert graphs.contexts == [("warmup", False), ("capture", False), ("warmup", True), ("capture", True)]
    assert step.stats == {"replays": 2 * STEPS, "captures": 1, "eager": 0, "invalidations": 0}
    assert not _default_device_active()            # the default device is not left behind
    assert len(_records(caplog, "builds tensors without naming a device (RuntimeError: CUDA error")) == 1


# -- eager fallbacks on direct calls (host states a CPU run cannot reach through the sampler) -----
def _inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, SIZE, SIZE, generator=g), torch.full((batch,), 2.0),
            torch.randn(batch, 8, reference_model.CONTEXT_DIM, generator=g))


def _call(patcher, x, t, ctx, more_options=None, **extra):
    """BaseModel.apply_model as the sampler calls it, with ``patcher`` driving the model."""
    import comfy.patcher_extension as pe
    patcher.model.current_patcher = patcher
    options = {"wrappers": pe.copy_nested_dicts(patcher.wrappers), "cond_or_uncond": [0], "sigmas": t,
               **(more_options or {})}
    with torch.no_grad():
        return patcher.model.apply_model(x, t, c_crossattn=ctx, transformer_options=options, **extra)


@pytest.mark.parametrize("state,expected", [
    ("lowvram", "partially loaded (lowvram / offload)"),
    ("hooks", "has hooks (scheduled LoRA / keyframes)"),
    ("grad", "autograd is on"),
    ("unkeyable", "transformer_options['other_pack_state'] holds a object, neither a tensor nor a plain value"),
])
def test_unsafe_host_states_run_eager(tiny_model, graphs, caplog, monkeypatch, state, expected):
    model, step = graph_step.install(tiny_model, backend=graphs)
    x, t, ctx = _inputs()
    with torch.no_grad():
        eager = tiny_model.model.apply_model(x, t, c_crossattn=ctx)
    extra = {}
    if state == "lowvram":
        monkeypatch.setattr(model.model, "model_lowvram", True)
    elif state == "hooks":
        monkeypatch.setattr(model, "hook_patches", {"a_hook": {}})
    elif state == "unkeyable":
        extra = {"more_options": {"other_pack_state": object()}}
    with caplog.at_level(logging.INFO, logger="octet"):
        for _ in range(2):
            if state == "grad":
                model.model.current_patcher = model
                import comfy.patcher_extension as pe
                with torch.enable_grad():
                    out = model.model.apply_model(x, t, c_crossattn=ctx, transformer_options={
                        "wrappers": pe.copy_nested_dicts(model.wrappers)}).detach()
            else:
                out = _call(model, x, t, ctx, **extra)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert len(_records(caplog, expected)) == 1, caplog.text
    assert step.stats["captures"] == 0 and step.stats["eager"] == 2


def test_a_partial_unload_drops_the_graphs(tiny_model, graphs, caplog, monkeypatch):
    """The host offloads part of a model to make room: the graphs' memory must go too, not wait for a reload."""
    model, step = graph_step.install(tiny_model, backend=graphs)
    x, t, ctx = _inputs()
    _call(model, x, t, ctx)
    assert len(step.cache.graphs) == 1
    monkeypatch.setattr(model.model, "model_lowvram", True)
    with caplog.at_level(logging.INFO, logger="octet"):
        out = _call(model, x, t, ctx)
    with torch.no_grad():
        torch.testing.assert_close(out, tiny_model.model.apply_model(x, t, c_crossattn=ctx), rtol=0, atol=0)
    assert not step.cache.graphs and step.stats["eager"] == 1
    assert len(_records(caplog, "model partially unloaded: 1 graph(s) dropped")) == 1, caplog.text


def test_keys_that_change_every_call_give_up_on_graphs(tiny_model, graphs, caplog):
    model, step = graph_step.install(tiny_model, capacity=1, backend=graphs)
    with caplog.at_level(logging.INFO, logger="octet"):
        for size in range(8, 8 + 8 * 4, 4):  # a new latent size every call: every call a capture
            x = torch.randn(1, 4, size, size)
            _call(model, x, torch.full((1,), 2.0), _inputs()[2])
    assert step.stats["captures"] == 5 and step.stats["eager"] == 3
    assert len(_records(caplog, "graph keys changed on almost every call")) == 1


def test_dynamic_vram_replays_unless_the_host_streams_a_modules_weights(graphs, caplog, monkeypatch):
    """ComfyUI 0.29's dynamic VRAM stages comfy.ops modules through comfy-aimdo (marked ``_v``: their weights are
    fetched or cast at every call, a kind of offload); a model where it staged none holds plain device tensors."""
    from comfyui_octet.fixtures import reference_model
    tiny_model = reference_model.build_tiny_sd15()      # its own: a module is marked staged below
    model, step = graph_step.install(tiny_model, backend=graphs)
    monkeypatch.setattr(model, "is_dynamic", lambda: True, raising=False)
    x, t, ctx = _inputs()
    with caplog.at_level(logging.INFO, logger="octet"):
        want = _call(model, x, t, ctx)
    assert step.stats["captures"] == 1 and step.stats["eager"] == 0
    staged = tiny_model.model.diffusion_model.out[2]
    staged._v = object()
    staged.weight = torch.nn.Parameter(staged.weight.detach().clone())     # a load moves what it stages
    with caplog.at_level(logging.INFO, logger="octet"):
        for _ in range(2):
            torch.testing.assert_close(_call(model, x, t, ctx), want, rtol=0, atol=0)
    assert step.stats["eager"] == 2 and step.stats["invalidations"] == 1
    assert len(_records(caplog, "dynamic VRAM (ComfyUI >= 0.29's default on NVIDIA) streams the weights of 1 "
                                "module(s) (out.2) at every call")) == 1


def test_forward_hooks_run_eager_every_step_and_graphs_resume_without_them(tiny_model, cpu_sample, graphs, caplog):
    """A hook on a layer (Profile Model's, another pack's) would be skipped by a replay: eager while it is there."""
    model, step = graph_step.install(tiny_model, backend=graphs)
    calls = []
    layer = tiny_model.model.diffusion_model.out[2]
    handle = layer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        with caplog.at_level(logging.INFO, logger="octet"):
            hooked = cpu_sample(model)
            cpu_sample(model)
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS and step.stats["captures"] == 0 and step.stats["eager"] == 2 * STEPS
    assert len(_records(caplog, "forward hook(s) on 'out.2' (Conv2d)")) == 1, caplog.text
    torch.testing.assert_close(hooked, cpu_sample(tiny_model), rtol=0, atol=0)
    torch.testing.assert_close(cpu_sample(model), hooked, rtol=0, atol=0)
    assert step.stats["captures"] == 1 and step.stats["replays"] == STEPS


def test_a_graph_leaving_too_little_vram_is_dropped_and_that_signature_runs_eager(tiny_model, cpu_sample, caplog):
    import comfy.model_management as mm
    tight = CpuGraphs(free=int(mm.minimum_inference_memory()) - (1 << 20))
    model, step = graph_step.install(tiny_model, backend=tight)
    with caplog.at_level(logging.INFO, logger="octet"):
        out = cpu_sample(model)
        cpu_sample(model)
    torch.testing.assert_close(out, cpu_sample(tiny_model), rtol=0, atol=0)
    assert tight.captured == 1 and not step.cache.graphs and step.stats["replays"] == 0
    assert step.stats["eager"] == 2 * STEPS
    keep = int(mm.minimum_inference_memory()) / 2**20
    assert len(_records(caplog, f"less than the {keep:.0f} MiB ComfyUI keeps for inference")) == 1, caplog.text


def test_a_capture_the_warm_up_shows_would_not_fit_beside_the_reserve_is_not_tried_until_memory_is_freed(
        tiny_model, cpu_sample, caplog):
    """An allocation failing inside a capture breaks torch's allocator for the process (H200, 2026-12-04): the
    warm-up's peak, which the graph's own pool needs again, and a quarter more must fit beside ComfyUI's reserve
    before capturing. The host freeing memory (an unload) lets that signature capture again."""
    import comfy.model_management as mm

    from comfyui_octet.kernels import vram
    keep = vram.reserve(torch.device("cpu"))
    short = CpuGraphs(free=keep + (80 << 20), peak=(64 << 20) + 4)
    want = cpu_sample(tiny_model)       # first: loading the float clone in the graphed one's place frees memory
    model, step = graph_step.install(tiny_model, backend=short)
    with caplog.at_level(logging.INFO, logger="octet"):
        out = cpu_sample(model)
        cpu_sample(model)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert short.captured == 0 and short.warmups == step.warmup and step.stats["eager"] == 2 * STEPS
    said = _records(caplog, f"capturing would need about 64 MiB for the step's activations in the graph's own "
                            f"memory pool; {(keep >> 20) + 80} MiB of VRAM is free and ComfyUI keeps {keep >> 20} MiB")
    assert len(said) == 1, caplog.text
    short.peak = 64 << 20                       # with its quarter, exactly fits; not tried before the host frees memory
    cpu_sample(model)
    assert short.captured == 0
    mm.unload_all_models()                      # the host freed memory: try again
    torch.testing.assert_close(cpu_sample(model), out, rtol=0, atol=0)
    assert short.captured == 1 and step.stats["replays"] == STEPS


def test_unloading_the_model_drops_its_graphs(tiny_model, cpu_sample, graphs, caplog):
    """ComfyUI counts an unloaded model's memory as free: its graphs' pools must go with it."""
    import comfy.model_management as mm
    model, step = graph_step.install(tiny_model, backend=graphs)
    cpu_sample(model)
    assert len(step.cache.graphs) == 1
    with caplog.at_level(logging.INFO, logger="octet"):
        mm.unload_all_models()
    assert not step.cache.graphs
    assert len(_records(caplog, "model unloaded: 1 graph(s) dropped")) == 1, caplog.text
    torch.testing.assert_close(cpu_sample(model), cpu_sample(tiny_model), rtol=0, atol=0)
    assert step.stats["captures"] == 2 and step.stats["invalidations"] == 0


def test_another_clone_loaded_in_its_place_drops_its_graphs_and_the_next_prompt_does_not(tiny_model, cpu_sample,
                                                                                        graphs, caplog):
    """load_models_gpu detaches every loaded clone of the model it loads, itself at each prompt: only another
    clone (the float MODEL of the same checkpoint) taking its place drops the graphs, whose memory the host no
    longer counts."""
    import comfy.model_management as mm
    model, step = graph_step.install(tiny_model, backend=graphs)
    first = cpu_sample(model)
    torch.testing.assert_close(cpu_sample(model), first, rtol=0, atol=0)      # the next prompt: same graph
    assert step.stats["captures"] == 1 and len(step.cache.graphs) == 1
    with caplog.at_level(logging.INFO, logger="octet"):
        mm.load_models_gpu([tiny_model])
    assert not step.cache.graphs
    assert len(_records(caplog, "another clone of the model is loaded in its place: 1 graph(s) dropped")) == 1
    torch.testing.assert_close(cpu_sample(model), first, rtol=0, atol=0)
    assert step.stats["captures"] == 2 and len(step.cache.graphs) == 1


def test_a_clone_being_collected_is_not_another_clone_loading():
    from comfyui_octet.nodes import host_compat

    class Patcher:
        def detach(self, unpatch_all=True):
            return host_compat.clone_loading_in_place_of(self)

    class Loaded:
        def __init__(self, model):
            self.model = model

    def load_models_gpu(loaded_model, detached):     # the host's local name, as in both hosts' model_management
        return detached.detach(unpatch_all=False)
    a, b = Patcher(), Patcher()
    assert a.detach(unpatch_all=False) is None                               # a garbage-collected clone
    assert load_models_gpu(Loaded(b), a) is None                             # not the host's function
    import comfy.model_management as mm
    host = type(load_models_gpu)(load_models_gpu.__code__, vars(mm))         # the same code in the host's module
    assert host(Loaded(b), a) is b and host(Loaded(a), a) is None            # another clone / itself again


# -- Quantize Model / Load Quantized install the graph step themselves ------------------------------
def _quantize_node(model, **kw):
    from comfyui_octet.nodes.quantize_nodes import QuantizeModel
    return QuantizeModel.execute(model=model, mode="dynamic", quantize_linear=True, quantize_conv=True,
                                 backend="auto", **kw).result


@pytest.mark.parametrize("goal,choice,on", [("speed", None, True), ("speed", "auto", True), ("speed", "off", False),
                                            ("memory", "auto", False), ("memory", "on", True)])
def test_quantize_model_replays_graphs_by_default_with_the_speed_goal(tiny_model, goal, choice, on):
    model, report = _quantize_node(tiny_model, goal=goal, **({"cuda_graph": choice} if choice else {}))
    step = graph_step.graph_step_of(model)
    assert (step is not None) == on and (step is None or (step.auto and step.cache.capacity == 2))
    assert ("CUDA graphs: on" in report) == on and ("CUDA graphs: off" in report) != on
    if on:   # the test host's models load on the CPU
        assert "loads on cpu: it will run eager" in report


def test_quantize_model_default_samples_as_eager_through_graphs(tiny_model, cpu_sample, graphs):
    model, _ = _quantize_node(tiny_model)
    eager, _ = _quantize_node(tiny_model, cuda_graph="off")
    step = graph_step.graph_step_of(model)
    step.backend = graphs                     # capture and replay with the CPU stand-in
    torch.testing.assert_close(cpu_sample(model), cpu_sample(eager), rtol=0, atol=0)
    assert step.stats == {"replays": STEPS, "captures": 1, "eager": 0, "invalidations": 0}


def test_default_graphs_on_a_cpu_run_eager_and_say_so_once_at_info(tiny_model, cpu_sample, caplog):
    """Nobody asked for graphs by name: the CPU fallback is an INFO line, not a warning, and said once."""
    model, _ = _quantize_node(tiny_model)
    eager, _ = _quantize_node(tiny_model, cuda_graph="off")
    with caplog.at_level(logging.INFO, logger="octet"):
        torch.testing.assert_close(cpu_sample(model), cpu_sample(eager), rtol=0, atol=0)
        cpu_sample(model)
    said = _records(caplog, "runs on cpu: CUDA graphs need a CUDA device")
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_bad_cuda_graph_choice_is_refused(tiny_model):
    with pytest.raises(ValueError, match="cuda_graph must be one of auto, on, off, got 'always'"):
        graph_step.install_default(tiny_model.clone(), "always", "speed")


def test_node_is_listed():
    from comfyui_octet.nodes import extension
    assert "OctetCudaGraphStep" in {cls.GET_SCHEMA().node_id for cls in extension.NODES}


# -- GPU: real graphs are bit-identical to eager ---------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("variant", ["float", "dynamic", "dynamic_triton"])
def test_gpu_graph_sampling_is_bit_identical_to_eager(variant):
    """An euler loop over apply_model (cond+uncond batch, cfg) with and without CUDA Graph Step.
    dynamic_triton forces every INT8 layer onto the Triton kernels, whose launches go direct
    (kernels/backends/triton_launch.py) once learned in the eager loop and the capture's warm-up."""
    import comfy.patcher_extension as pe
    import comfy.samplers
    source = reference_model.build_tiny_sd15()
    config = {"float": None, "dynamic": config_for_mode("dynamic"),
              "dynamic_triton": config_for_mode("dynamic", backend="triton")}[variant]
    base = source if config is None else bridge.quantize_model(source, config)[0]
    model, step = graph_step.install(base)
    cuda = torch.device("cuda")
    model.load_device = cuda
    model.patch_model(device_to=cuda)
    model.model.to(cuda)  # the object-patched INT8 layers too, whatever the host's load policy
    try:
        g = torch.Generator().manual_seed(0)
        sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "normal", 8).to(cuda)
        noise = torch.randn(1, 4, 32, 32, generator=g).to(cuda)
        ctx = torch.cat([reference_model.tiny_conditioning(seed=1)[0][0],
                         reference_model.tiny_conditioning(seed=2)[0][0]]).to(cuda)

        def euler(wrappers):
            model.model.current_patcher = model
            x = noise * sigmas[0]
            for i in range(len(sigmas) - 1):
                options = {"wrappers": pe.copy_nested_dicts(wrappers), "cond_or_uncond": [0, 1],
                           "sigmas": sigmas[i:i + 1], "sample_sigmas": sigmas}
                with torch.inference_mode():
                    den = model.model.apply_model(torch.cat([x, x]), sigmas[i].expand(2), c_crossattn=ctx,
                                                  transformer_options=options)
                cond, uncond = den.chunk(2)
                den = uncond + 4.0 * (cond - uncond)
                x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            return x
        eager = euler(base.wrappers)
        graphed = euler(model.wrappers)
        again = euler(model.wrappers)
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))
    assert step.stats["captures"] == 1 and step.stats["replays"] == 16 and step.stats["eager"] == 0
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert next(iter(step.cache.graphs.values())).bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_gpu_quantize_model_default_replays_through_the_stock_ksampler():
    """Quantize Model's default on a GPU, through the host's KSampler: the sampler hands the conditioning over
    on the CPU (BaseModel casts it to the device itself), which once sent every call eager; now the steps
    replay, and the latent is the eager one bit for bit."""
    import nodes
    cuda = torch.device("cuda")
    source = reference_model.build_tiny_sd15()
    source.model.to(cuda)    # as a GPU host holds a loaded model (these tests run the host in --cpu mode)
    source.load_device = source.offload_device = cuda
    model, _ = _quantize_node(source)
    eager, _ = _quantize_node(source, cuda_graph="off")
    step = graph_step.graph_step_of(model)
    pos, neg = reference_model.tiny_conditioning(seed=1), reference_model.tiny_conditioning(seed=2)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    assert pos[0][0].device.type == "cpu"

    def run(m, seed):
        return nodes.common_ksampler(m, seed, 6, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    try:
        want, got, other, same = run(eager, 1), run(model, 1), run(model, 2), run(model, 1)
    finally:
        import comfy.model_management as mm
        mm.unload_all_models()
    assert step.stats["captures"] == 1 and step.stats["replays"] == 18 and step.stats["eager"] == 0, step.report()
    rel = float((got - want).norm() / want.norm())
    assert torch.equal(same, got) and not torch.equal(other, got), rel
    assert rel < 1e-2, rel


def test_the_int8_attention_override_is_captured_not_refused(tiny_model, graphs, caplog):
    """transformer_options carrying the INT8 Attention node's override (octet/attention.py) is keyed by what it is,
    not run eager as an unknown object would be; another setting of it is another graph."""
    from comfyui_octet.octet import attention
    model, step = graph_step.install(tiny_model, backend=graphs)
    x, t, ctx = _inputs()
    with caplog.at_level(logging.INFO, logger="octet"):
        for smooth in (True, True, False):
            _call(model, x, t, ctx, more_options={attention.OPTION: attention.Int8Attention(smooth)})
    assert step.stats["eager"] == 0 and step.stats["captures"] == 2 and step.stats["replays"] == 3, step.report()
