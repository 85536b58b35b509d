"""torch.compile sees each quantized layer as one custom op: no graph break, same numbers."""
import pytest
import torch
import torch._dynamo

from comfyui_octet import kernels, octet
from compile_checks import assert_compiles_as_eager


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.proj = torch.nn.Linear(16, 32)

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x))
        return self.proj(h.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_quantized_layers_compile_without_graph_breaks_and_match_eager(rng, mode):
    model = Block().eval()
    octet.quantize_(model, octet.config_for_mode(mode))
    assert_compiles_as_eager(model, torch.randn(2, 4, 8, 8, generator=rng))


def test_custom_ops_pass_opcheck(rng):
    x = torch.randn(3, 5, 16, generator=rng)
    qw, ws = kernels.quantize_weight(torch.randn(8, 16, generator=rng))
    for backend in ("torch", "cpu"):
        torch.library.opcheck(torch.ops.octet.linear.default,
                              (x, qw, ws, None, None, None, "dynamic", backend, "speed"))
    xc = torch.randn(2, 4, 7, 9, generator=rng)
    qc, sc = kernels.quantize_weight(torch.randn(6, 4, 3, 3, generator=rng))
    torch.library.opcheck(torch.ops.octet.conv2d.default,
                          (xc, qc, sc, None, None, None, [2, 2], [1, 1], [1, 1], 1, "dynamic", "torch", "speed"))


def test_a_second_copy_of_the_pack_reuses_the_ops_instead_of_redefining_them(rng):
    """ComfyUI's loader imports the pack under its folder path: the ops must not be defined twice."""
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("octet_second_copy", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    sys.modules["octet_second_copy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["octet_second_copy"])
    second = importlib.import_module("octet_second_copy.kernels")
    assert second.ops.linear is torch.ops.octet.linear and second.ops.conv2d is torch.ops.octet.conv2d
    assert second.ops.static_mlp is torch.ops.octet.static_mlp
    x = torch.randn(4, 16, generator=rng)
    qw, ws = kernels.quantize_weight(torch.randn(8, 16, generator=rng))
    torch.testing.assert_close(second.ops.linear(x, qw, ws, None, None, None, "dynamic", "torch", "speed"),
                               kernels.linear(x, qw, ws, act="dynamic"), rtol=0, atol=0)


def test_compiled_layers_run_their_own_cached_plans(rng, monkeypatch):
    """A compiled graph calls octet::linear / octet::conv2d with the layer's tensors every step; the op
    must run the layer's cached plan (built once, as in eager), not plan again per call: planning per
    call re-prepared the weight side every step (compiled Flux-dev was 0.81x compiled bf16)."""
    import copy
    from comfyui_octet.kernels import dispatch, ops

    model = Block().eval()
    octet.quantize_(model, octet.config_for_mode("dynamic"))
    x = torch.randn(2, 4, 8, 8, generator=rng)
    eager = model(x)   # builds each layer's plan for this signature
    planned = []
    real_plan = dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda *a, **k: planned.append(a[0]) or real_plan(*a, **k))
    monkeypatch.setattr(kernels, "plan", dispatch.plan)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    assert planned == [], f"compiled calls planned again: {planned}"

    # The op finds its layer by number and only while the layer holds the very weight it was given.
    conv = model.conv
    assert ops.owner_of(conv.op_owner, conv.weight, x) is conv
    assert ops.owner_of(conv.op_owner, conv.weight.clone(), x) is None
    # A deep copy holds other tensors: it gets its own number and still computes the same.
    twin = copy.deepcopy(model)
    assert twin.conv.op_owner != conv.op_owner and ops.owner_of(twin.conv.op_owner, twin.conv.weight, x) is twin.conv
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(twin, backend="aot_eager", fullgraph=True)(x), eager, rtol=0, atol=0)
    # Without a live owner (a graph outliving its model) the op plans for the call and stays correct.
    number, weight, scale = conv.op_owner, conv.weight, conv.current_weight_scale()
    del model, compiled, conv
    import gc
    gc.collect()
    assert ops.owner_of(number, weight, x) is None
    y = ops.conv2d(x, weight, scale, twin.conv.bias, None, None, [1, 1], [1, 1], [1, 1], 1, "dynamic", "auto",
                   "speed", number)
    torch.testing.assert_close(y, twin.conv(x), rtol=0, atol=0)


class Chain(torch.nn.Module):
    """Octet layers and nothing else between input and output: a graph of custom ops replays their very kernels."""
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(1024, 2048)
        self.fc2 = torch.nn.Linear(2048, 1024)
        self.out = torch.nn.Linear(1024, 64)

    def forward(self, x):
        return self.out(self.fc2(self.fc1(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("eager_first", [False, True], ids=["plans-in-warmup", "plans-before"])
@pytest.mark.parametrize("how", ["reduce-overhead", "cudagraphs"])
def test_compiled_with_cuda_graphs_matches_eager(rng, how, eager_first):
    """torch.compile with CUDA graphs (mode reduce-overhead; ComfyUI's TorchCompileModel, backend cudagraphs)
    warms each graph up eagerly with this thread's allocations routed to its pool, then rejects any live tensor
    there that is not an output. A plan built in that run (plans-in-warmup: its float weight copy) or the scratch
    made for the trees' stream (plans-before) failed it: "Detected 24 tensor(s) in the cudagraph pool not tracked
    as outputs" (Flux-dev, H100, 2026-12-06). kernels/graph_pool.py keeps them out of the pool."""
    torch._dynamo.reset()
    model = Chain().to("cuda", torch.bfloat16).eval()
    octet.quantize_(model, octet.config_for_mode("dynamic"))
    model.fc1.backend = "triton"    # INT8 whatever the cost model says of these shapes: the scratch is used
    model.out.backend = "float"     # a float copy of its weight, made at the plan's first call and kept
    x = torch.randn(2048, 1024, generator=rng).to("cuda", torch.bfloat16)
    if eager_first:
        with torch.no_grad():
            model(x)
    compile_args = {"mode": "reduce-overhead"} if how == "reduce-overhead" else {"backend": "cudagraphs"}
    compiled = torch.compile(model, fullgraph=True, **compile_args)
    with torch.no_grad():
        outs = [compiled(x).clone() for _ in range(4)]    # warm-up, record, replays
        eager = model(x)
    assert model.out.plan(x).impl.name == "float" and model.fc1.plan(x).impl.name != "float"
    for y in outs:
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
    torch._dynamo.reset()
