"""kernels/graph_pool.py: memory a layer keeps past a call steps out of torch.compile's CUDA-graph warm-up pool.

The allocator's routing is faked here (no GPU in CI): what is checked is the bookkeeping, that the routing
ends (and its pool reference is dropped) only inside a warm-up run on this thread, comes back after the block
even when it raises, and that the cold paths which keep memory (a plan built, a derived weight remembered, a
scratch buffer grown) run inside it. tests/octet/test_compile.py compiles with CUDA graphs on a GPU.
"""
import sys
import types

import pytest
import torch

from comfyui_octet import kernels, octet
from comfyui_octet.kernels import graph_pool
from comfyui_octet.kernels.backends import scratch, triton_support

POOL = (0, 7)


@pytest.fixture
def allocator(monkeypatch):
    """Fake routing calls and a fake graph-trees manager in its warm-up state on device 0."""
    calls = []
    state = types.SimpleNamespace(routed=True, capturing=False, warming=True)

    def end(index, pool):
        if not state.routed:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        state.routed = False
        calls.append(("end", index, pool))

    def begin(index, pool):
        state.routed = True
        calls.append(("begin", index, pool))

    class Manager:   # CUDAGraphTreeManager's two members that graph_pool reads
        cuda_graphs_thread_pool = POOL
        in_warmup = property(lambda self: state.warming)
    manager = Manager()
    trees = types.SimpleNamespace(get_manager=lambda index, create_if_none_exists=True: manager if index == 0
                                  else None)
    monkeypatch.setitem(sys.modules, "torch._inductor.cudagraph_trees", trees)
    monkeypatch.setattr(graph_pool, "_end", end)
    monkeypatch.setattr(graph_pool, "_begin", begin)
    monkeypatch.setattr(graph_pool, "_release", lambda index, pool: calls.append(("release", index, pool)))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state.capturing)
    state.calls = calls
    return state


CUDA0 = torch.device("cuda", 0)


def test_routing_ends_inside_the_block_and_comes_back_after_it(allocator):
    with graph_pool.outside(CUDA0):
        assert not allocator.routed
        allocator.calls.append("body")
    assert allocator.routed
    assert allocator.calls == [("end", 0, POOL), ("release", 0, POOL), "body", ("begin", 0, POOL)]


def test_routing_comes_back_when_the_block_raises(allocator):
    with pytest.raises(ValueError, match="boom"):
        with graph_pool.outside(CUDA0):
            raise ValueError("boom")
    assert allocator.routed and allocator.calls[-1] == ("begin", 0, POOL)


@pytest.mark.parametrize("case", ["cpu", "other device", "not warming", "capturing", "not routed", "no trees"])
def test_nothing_changes_outside_a_warm_up_run_on_this_thread(allocator, monkeypatch, case):
    device = {"cpu": torch.device("cpu"), "other device": torch.device("cuda", 1)}.get(case, CUDA0)
    allocator.warming = case != "not warming"
    allocator.capturing = case == "capturing"   # a capture's memory belongs to its graph: left in the pool
    allocator.routed = case != "not routed"      # the manager is still in warm-up, its run is over
    if case == "no trees":
        monkeypatch.delitem(sys.modules, "torch._inductor.cudagraph_trees")
    with graph_pool.outside(device):
        pass
    assert allocator.calls == [] and allocator.routed == (case != "not routed")


def test_the_cold_paths_that_keep_memory_run_outside_the_pool(allocator, monkeypatch, rng):
    """A layer's plan (static scales on the device, the backend's prepared weight), a derived weight an operand
    set remembers, a scratch buffer grown: each is made with the routing ended. The eager hot path (a cached
    plan) never asks."""
    inside = []
    real_outside = graph_pool.outside

    def outside(device):
        inside.append(device.type)
        return real_outside(CUDA0)   # the fake manager warms device 0 up: stand in for the CPU tensors here
    monkeypatch.setattr(graph_pool, "outside", outside)

    layer = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    octet.quantize_(layer, octet.config_for_mode("dynamic"))
    real_plan = kernels.plan
    monkeypatch.setattr(kernels, "plan", lambda *a, **k: inside.append(allocator.routed) or real_plan(*a, **k))
    x = torch.randn(3, 16, generator=rng)
    layer(x)
    # The plan ends the routing and is built without it; what it remembers inside (the CPU backend's
    # transposed weight) asks again, finds the routing already ended and leaves it so.
    assert inside[:2] == ["cpu", False] and set(inside[2:]) <= {"cpu"}, inside
    assert allocator.calls[:2] == [("end", 0, POOL), ("release", 0, POOL)] and allocator.calls[2:] == [
        ("begin", 0, POOL)] and allocator.routed
    asked = len(inside)
    layer(x)
    assert len(inside) == asked, "a cached plan asked again"

    ops = kernels.Int8Operands(*kernels.quantize_weight(torch.randn(8, 16, generator=rng)))
    made = ops.remember("derived", lambda: inside.append(allocator.routed) or torch.zeros(1))
    assert inside[-2:] == ["cpu", False] and ops.remember("derived", lambda: 1 / 0) is made

    del inside[:]
    codes, scales = scratch._allocate(64, 4, torch.device("cpu"))
    weight = scratch._allocate_weight(32, torch.bfloat16, torch.device("cpu"))
    assert inside == ["cpu", "cpu"] and allocator.routed
    assert (codes.dtype, codes.numel(), scales.dtype, scales.numel()) == (torch.int8, 64, torch.float32, 4)
    assert (weight.dtype, weight.numel()) == (torch.bfloat16, 32)


@pytest.mark.skipif(not triton_support.interpreting(), reason="needs Triton (TRITON_INTERPRET=1 on CPU)")
def test_a_triton_plans_entries_made_at_their_first_call_run_outside_the_pool(allocator, monkeypatch, rng):
    """What a W8A8 plan makes at the first call of an entry and keeps (its GELU-epilogue twin, the deferred inputs'
    quantizers) is made with the routing ended: torch.compile's reduce-overhead warm-up is where a compiled graph's
    octet::linear_fused calls first reach them (octet/compile_pass.py)."""
    real_outside = graph_pool.outside
    monkeypatch.setattr(graph_pool, "outside", lambda device: real_outside(CUDA0))
    layer = octet.modules.QuantLinear.from_float(torch.nn.Linear(16, 8), "dynamic", backend="triton")
    x = torch.randn(3, 16, generator=rng)
    run = layer.plan(x).run
    del allocator.calls[:]      # the plan's own (test above)
    routed = []
    for name in ("_make_gelu", "_make_norm"):
        made = getattr(run, name)
        monkeypatch.setattr(run, name, lambda *a, made=made, **k: routed.append(allocator.routed) or made(*a, **k))
    twin = run.with_gelu()
    run.gelu_input(torch.randn(3, 4, generator=rng), torch.randn(3, 12, generator=rng), None)
    run.norm_input(x, 1e-6, None, None, None)
    assert twin is not run and routed == [False, False] and allocator.routed
    assert [c[0] for c in allocator.calls] == ["end", "release", "begin"] * 3
