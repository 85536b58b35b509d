"""triton_launch: Triton's dispatch once per key, the compiled launcher after it.

On CPU the bookkeeping is tested against a stand-in for Triton's kernel objects (the interpreter
has no compiled launchers, so the real thing is off there); on a GPU, planned layers whose
launches go direct are checked against the torch reference over inputs that change every call.
"""
from __future__ import annotations

import logging

import pytest
import torch

from comfyui_octet.kernels import torch_ref
from comfyui_octet.kernels.backends import triton_launch, triton_support


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, 7, "meta"

    def run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *args):
        self.log.append(("direct", (g0, g1, g2), stream, args))


class FakeJIT:
    arg_names = ["x", "out", "n", "FLAG", "BLOCK"]

    def __init__(self):
        self.log = []
        self.compiled = FakeCompiled(self.log)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid({"BLOCK": 4, **kwargs}), args, kwargs))
        return launch

    def run(self, *args, grid, warmup, **kwargs):
        assert warmup
        self.log.append(("compile", args, kwargs))
        return self.compiled


class FakeConfig:
    kwargs = {"BLOCK": 4}

    def all_kwargs(self):
        return {"BLOCK": 4, "num_warps": 2}


class FakeAutotuner:
    arg_names = FakeJIT.arg_names   # Triton's Autotuner has arg_names too: not what tells them apart

    def __init__(self):
        self.fn = FakeJIT()
        self.best_config = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.best_config = FakeConfig()
            self.fn[grid](*args, **kwargs, BLOCK=4)
        return launch


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(triton_launch, "enabled", lambda: True)
    monkeypatch.setattr(triton_launch, "_driver", lambda: FakeDriver())
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(triton_launch, "_is_jit", lambda kernel: isinstance(kernel, FakeJIT))


def test_first_call_per_key_goes_through_triton_then_direct_with_fresh_arguments(direct):
    kernel = FakeAutotuner()
    launcher = triton_launch.Launcher(kernel, "fake")
    assert launcher.autotuned and launcher.jit is kernel.fn
    built = []

    def call(key, x):
        def build(meta):
            built.append(meta)
            return (x, "out", 3)
        launcher(key, lambda meta: (x // meta["BLOCK"],), build, {"FLAG": True})

    call(("k1",), 16)
    kinds = [entry[0] for entry in kernel.fn.log]
    # Triton's launch, the compile lookup with the chosen config, one validating direct launch.
    assert kinds == ["triton", "compile", "direct"]
    assert kernel.fn.log[1][2] == {"FLAG": True, "BLOCK": 4, "num_warps": 2}
    assert built[0] is None and built[1] == {"FLAG": True, "BLOCK": 4}
    kernel.fn.log.clear()
    call(("k1",), 32)
    # Direct: grid from the recorded config, this call's arguments, then the constexprs in kernel order.
    assert kernel.fn.log == [("direct", (8, 1, 1), 1234, (32, "out", 3, True, 4))]
    kernel.fn.log.clear()
    call(("k2",), 32)   # a new specialization key: Triton again
    assert [entry[0] for entry in kernel.fn.log] == ["triton", "compile", "direct"]
    assert set(launcher.records) == {(0, ("k1",)), (0, ("k2",))}   # (current device, key)


def test_the_compile_lookup_gets_tensor_descriptors_where_direct_launches_get_tma_tuples(direct):
    from triton.tools.tensor_descriptor import TensorDescriptor
    kernel = FakeJIT()
    launcher = triton_launch.Launcher(kernel, "fake_tma")
    codes = torch.zeros(4, 16, dtype=torch.int8)

    def build(meta):
        return (TensorDescriptor(codes, [4, 16], [16, 1], [16, 16]) if meta is None
                else triton_launch.Tma(codes, (4, 16), (16, 1), (4, 16)), "out", 3)
    launcher(("k",), lambda meta: (1,), build, {"FLAG": True, "BLOCK": 8})
    compile_args = kernel.log[1][1]
    assert isinstance(compile_args[0], TensorDescriptor) and compile_args[0].block_shape == [4, 16]
    assert isinstance(kernel.log[2][3][0], triton_launch.Tma)      # the validating direct launch


def test_a_launcher_that_rejects_our_call_turns_direct_launches_off_and_says_so(direct, caplog):
    kernel = FakeAutotuner()

    def broken(*args):
        raise TypeError("launcher takes 12 arguments")
    kernel.fn.compiled.run = broken
    launcher = triton_launch.Launcher(kernel, "fake_broken")
    with caplog.at_level(logging.WARNING, logger="octet"):
        launcher(("k",), lambda meta: (1,), lambda meta: (1, "out", 3), {"FLAG": False})
        launcher(("k",), lambda meta: (1,), lambda meta: (1, "out", 3), {"FLAG": False})
    assert not launcher.direct and not launcher.records
    assert [entry[0] for entry in kernel.fn.log] == ["triton", "compile", "triton"]
    warnings = [r.getMessage() for r in caplog.records if "fake_broken" in r.getMessage()]
    assert len(warnings) == 1 and "launcher takes 12 arguments" in warnings[0]


def test_a_launcher_made_for_one_call_launches_once_through_triton_and_learns_nothing(direct):
    """A plan used once (a streamed layer's per-call plan, the functional kernels.linear) gets a fresh launcher per
    call: learning would launch its kernel twice more at every call (3x a streamed layer's GEMM on the GPU, measured
    1108 vs 367 us on an H100). Inside registry.one_call_plans its launchers take Triton's path alone; the process's
    shared launchers, made lazily wherever their first launch happens, learn whatever the context."""
    from comfyui_octet.kernels import registry
    with registry.one_call_plans():
        once = triton_launch.Launcher(FakeAutotuner(), "fake")
        assert registry.planning_one_call()
        triton_launch._shared.pop("fake-shared", None)
        shared = triton_launch.shared(FakeAutotuner(), "fake-shared")
    assert not registry.planning_one_call()
    for launcher in (once, shared):
        for x in (16, 32):
            launcher(("k1",), lambda meta: (x // meta["BLOCK"],), lambda meta: (x, "out", 3), {"FLAG": True})
    assert [entry[0] for entry in once.kernel.fn.log] == ["triton", "triton"] and not once.records
    assert [entry[0] for entry in shared.kernel.fn.log] == ["triton", "compile", "direct", "direct"]
    triton_launch._shared.pop("fake-shared", None)
    kept = triton_launch.Launcher(FakeAutotuner(), "fake")     # outside the context: learns, as before
    assert kept.direct


def test_a_plan_for_one_call_makes_launchers_that_do_not_learn_and_a_kept_plan_does(monkeypatch):
    """kernels.plan(one_call=True) (octet/modules.py plans a streamed layer so at every call) and the functional
    w8a8_gemm / quantize_rows make their Triton objects inside registry.one_call_plans; a kept plan's learn."""
    from comfyui_octet import kernels
    from comfyui_octet.kernels.backends import triton_gemm, triton_quant
    monkeypatch.setattr(triton_launch, "enabled", lambda: True)
    monkeypatch.setattr(triton_launch, "_driver", lambda: FakeDriver())
    made = []
    for cls in (triton_gemm.W8A8Gemm, triton_quant.RowQuantizer):
        init = cls.__init__

        def spy(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            made.append(self.launcher.direct)
        monkeypatch.setattr(cls, "__init__", spy)
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=g)
    ops = kernels.Int8Operands.of(qweight, torch.rand(8, 1, generator=g) + 0.5)
    x = torch.randn(3, 16, generator=g)
    kernels.plan("linear", "dynamic", x, ops, "triton", "speed", one_call=True)
    assert made == [False, False]
    kernels.plan("linear", "dynamic", x, ops, "triton", "speed")
    assert made[2:] == [True, True]
    monkeypatch.setattr(triton_launch.Launcher, "__call__", lambda self, *args: None)    # construction is the point
    triton_quant.quantize_rows(x.bfloat16())
    triton_gemm.w8a8_gemm(torch.zeros(3, 16, dtype=torch.int8), torch.ones(3), qweight, torch.ones(8), None,
                          torch.bfloat16)
    assert made[4:] == [False, False]


def test_no_direct_launch_while_a_launch_hook_is_set(direct, monkeypatch):
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: True)
    kernel = FakeAutotuner()
    launcher = triton_launch.Launcher(kernel, "fake_hooked")
    for _ in range(2):
        launcher(("k",), lambda meta: (1,), lambda meta: (1, "out", 3), {"FLAG": False})
    assert [entry[0] for entry in kernel.fn.log] == ["triton", "triton"]


def test_plain_jit_kernel_records_its_flags_as_constexprs(direct):
    kernel = FakeJIT()
    launcher = triton_launch.Launcher(kernel, "fake_plain")
    assert not launcher.autotuned
    for x in (5, 6):
        launcher(("k",), lambda meta: (2,), lambda meta, x=x: (x, "out", 3),
                 {"FLAG": True, "BLOCK": 8, "num_warps": 4})
    assert kernel.log[-1] == ("direct", (2, 1, 1), 1234, (6, "out", 3, True, 8))


def test_off_under_the_interpreter_and_by_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_launch.enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("OCTET_FAST_LAUNCH", "0")
    assert not triton_launch.enabled()


def test_real_autotuned_kernels_are_seen_as_autotuned():
    from comfyui_octet.kernels.backends import triton_gemm, triton_quant
    gemm = triton_launch.Launcher(triton_gemm._w8a8_kernel, "gemm")
    quant = triton_launch.Launcher(triton_quant._quantize_rows_kernel, "quant")
    assert gemm.autotuned and "BLOCK_M" in gemm.jit.arg_names
    assert not quant.autotuned and quant.jit is triton_quant._quantize_rows_kernel


def test_specialization_facts_and_hook_chains():
    assert triton_launch.facts(1, 16, 0, 17, 4096) == (1, 16, 16, 0, 16)
    t = torch.zeros(8)
    assert triton_launch.facts(t, t[1:]) == (True, False)

    class Chain:   # Triton 3.5+: hooks are HookChains, never None
        def __init__(self, calls):
            self.calls = calls
    assert not triton_launch._hook_set(None) and not triton_launch._hook_set(Chain([]))
    assert triton_launch._hook_set(Chain([print])) and triton_launch._hook_set(print)


def test_host_side_launch_arithmetic_equals_tritons_own():
    """triton_support.cdiv / next_power_of_2 stand in for Triton's ConstexprFunctions on the launch path (those
    unwrap every argument, ~2 us per call): the same integers."""
    import triton
    for n in list(range(0, 5000)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**30]:
        assert triton_support.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 4096):
            assert triton_support.cdiv(n, d) == triton.cdiv(n, d), (n, d)


# Triton 3.6's compiled launcher, as far as _c_launcher reads it: a CudaLauncher whose ``launch`` wraps the
# generated C function in a closure that expands each descriptor argument per call.
_ENCODED = []


def make_tensordesc_arg(arg, metadata):
    _ENCODED.append((arg.base, metadata["block_size"]))
    return [f"map{len(_ENCODED)}", *arg.shape, *arg.strides]


def _wrap(launcher, tensordesc_indices, tensordesc_meta):
    def inner(*args):
        final, d = list(args[:13]), 0
        for i, arg in enumerate(args[13:]):
            if i in tensordesc_indices:
                final.extend(make_tensordesc_arg(arg, tensordesc_meta[d]))
                d += 1
            else:
                final.append(arg)
        return launcher(*final)
    return inner


class CudaLauncher:
    num_ctas, global_scratch_size, profile_scratch_size = 1, 0, 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, c_calls, indices=(0, 1)):
        self.launch = _wrap(lambda *args: c_calls.append(args), set(indices),
                            [{"block_size": [64, 128]} for _ in indices])


class Compiled36:
    function, packed_metadata = 7, "packed"

    def __init__(self, c_calls, **kw):
        self.run = CudaLauncher(c_calls, **kw)


def test_c_launcher_expands_descriptors_like_tritons_wrapper_and_encodes_a_weights_once():
    calls = []
    launch = triton_launch._c_launcher(Compiled36(calls), tail=(True, 64))
    assert launch is not None
    weight = triton_launch.WeightDescriptors(torch.zeros(8, 16, dtype=torch.int8)).get(
        {"BLOCK_N": 64, "BLOCK_K": 128})
    _ENCODED.clear()
    xs = [torch.zeros(4, 16, dtype=torch.int8) for _ in range(3)]     # three addresses
    for x in xs:
        launch(2, 1, 1, 99, (weight, triton_launch.Tma(x, (4, 16), (16, 1), (64, 128)), "out", 5))
    # Base arguments as CudaLauncher.__call__ passes them (no scratch), the weight's map made once and
    # reused, each new activation address's made at its first call, then the constexpr tail.
    assert calls[0] == (2, 1, 1, 99, 7, False, True, None, None, "packed", None, None, None,
                        "map1", 8, 16, 16, 1, "map2", 4, 16, 16, 1, "out", 5, True, 64)
    assert [c[13] for c in calls] == ["map1"] * 3 and [c[18] for c in calls] == ["map2", "map3", "map4"]
    assert [base for base, _ in _ENCODED] == [weight.base, *xs]


def test_an_activations_map_is_kept_per_address_and_shape():
    """A plan's scratch codes come back at one address per (M, K) (scratch.py): their map is encoded once.
    Another address, shape or stride is another map (the map encodes them all)."""
    calls = []
    launch = triton_launch._c_launcher(Compiled36(calls), tail=())
    weight = triton_launch.WeightDescriptors(torch.zeros(8, 16, dtype=torch.int8)).get(
        {"BLOCK_N": 64, "BLOCK_K": 128})
    buffer = torch.zeros(64, dtype=torch.int8)
    other = torch.zeros(64, dtype=torch.int8)
    acts = [(buffer, (4, 16), (16, 1)), (buffer, (4, 16), (16, 1)), (buffer[:32], (2, 16), (16, 1)),
            (buffer, (4, 16), (16, 1)), (other, (4, 16), (16, 1)), (buffer, (2, 16), (32, 1))]
    _ENCODED.clear()
    for base, shape, strides in acts:
        launch(1, 1, 1, 0, (weight, triton_launch.Tma(base, shape, strides, (64, 128))))
    assert [c[18] for c in calls] == ["map2", "map2", "map3", "map2", "map4", "map5"]
    assert [c[19:23] for c in calls] == [s + st for _, s, st in acts]
    assert len(_ENCODED) == 5


def test_a_weights_map_is_encoded_again_when_its_storage_moves():
    """ComfyUI offloads and reloads a model by swapping each Parameter's storage (Module._apply sets .data):
    the same descriptor object then describes a new address, and a kept map would read freed memory."""
    calls = []
    launch = triton_launch._c_launcher(Compiled36(calls), tail=())
    weight = torch.nn.Parameter(torch.zeros(8, 16, dtype=torch.int8), requires_grad=False)
    desc = triton_launch.WeightDescriptors(weight).get({"BLOCK_N": 64, "BLOCK_K": 128})
    act = triton_launch.Tma(torch.zeros(4, 16, dtype=torch.int8), (4, 16), (16, 1), (64, 128))
    _ENCODED.clear()
    launch(1, 1, 1, 0, (desc, act))
    launch(1, 1, 1, 0, (desc, act))
    weight.data = torch.ones(8, 16, dtype=torch.int8)           # what .to(device) does to a Parameter
    launch(1, 1, 1, 0, (desc, act))
    weight_maps = [c[13] for c in calls]
    assert weight_maps[0] == weight_maps[1] != weight_maps[2]
    assert sum(1 for base, _ in _ENCODED if base is weight) == 2


def test_c_launcher_declines_launchers_of_another_shape():
    calls = []
    other = Compiled36(calls)
    other.run.global_scratch_size = 128       # scratch memory: Triton's __call__ allocates it
    assert triton_launch._c_launcher(other, ()) is None
    assert triton_launch._c_launcher(type("C", (), {"run": print, "function": 1, "packed_metadata": 2})(), ()) is None


def _prepared(layer):
    """The prepared kernel objects of a layer's plans: a W8A8 plan's quantizer and GEMM (attributes of its
    run object), a weight-only plan's W8A16Linear (in its run function's closure)."""
    found = []
    for plan in layer._plans.values():
        run = plan.run
        parts = [getattr(run, name) for name in ("quantize", "gemm") if hasattr(run, name)]
        parts += [cell.cell_contents for cell in getattr(run, "__closure__", None) or ()]
        found += [p for p in parts if hasattr(p, "launcher") or hasattr(p, "fused")]
    return found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need compiled kernels (CUDA)")
@pytest.mark.parametrize("act", ["none", "dynamic", "static"])
def test_planned_layer_launches_direct_and_equals_tritons_own_path_on_changing_inputs(act, monkeypatch):
    """Same layer, same inputs: launches through Triton's dispatch (OCTET_FAST_LAUNCH=0) and direct ones
    give identical outputs, while M, the input's alignment and the static scale's group change from
    call to call (a launch reusing an earlier call's pointers or specialization would differ)."""
    from kernel_testing import assert_epilogue_close
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.octet.modules import QuantLinear
    from comfyui_octet.octet.timestep import GroupSelector

    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(256, 384, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(4096 * 256 + 1, device="cuda", dtype=torch.bfloat16, generator=g)
    steps = [64, 64, 17, 17, 1, 1, 4096, 4096, 64, 63, 63, 64]

    def run(env):
        monkeypatch.setenv("OCTET_FAST_LAUNCH", env)
        layer = QuantLinear.from_float(lin, act, backend="triton")
        if act == "static":   # group slices of one tensor start 4 bytes apart: not all 16-byte aligned
            layer.set_static_scales(torch.tensor([0.03, 0.05, 0.02]), GroupSelector(boundaries=[1.0, 2.0]))
        outs = []
        with torch.no_grad():
            for step, m in enumerate(steps):
                offset = step % 2   # odd steps read a view 2 bytes into its storage
                x = big[offset:offset + m * 256].view(m, 256)
                if act == "static":
                    layer.group_selector.index = step % 3
                outs.append(layer(x))
        return layer, outs

    _, through_triton = run("0")
    layer, direct = run("1")
    for step, (a, b) in enumerate(zip(through_triton, direct)):
        assert torch.equal(a, b), (step, steps[step])
    x = big[:63 * 256].view(63, 256)
    scale = layer.input_scale[1:2].cuda() if act == "static" else None
    if act == "none":
        expected = torch_ref.linear_w8a16(x, layer.weight, layer.weight_scale, layer.bias)
    else:
        expected = torch_ref.linear_w8a8(x, layer.weight, layer.weight_scale, layer.bias, None, scale)
    assert_epilogue_close(direct[-2], expected)
    launchers = [launcher for p in _prepared(layer)
                 for launcher in ((p.fused.launcher, p.dequant) if hasattr(p, "fused") else (p.launcher,))]
    # Every launcher is direct; those a bucket used learned keys (weight-only at M=4096 runs the
    # dequantize kernel + cuBLAS, below that the fused kernel).
    assert launchers and all(launcher.direct for launcher in launchers)
    assert sum(bool(launcher.records) for launcher in launchers) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need compiled kernels (CUDA)")
def test_planned_conv_launches_direct_and_equals_tritons_own_path_on_changing_inputs(monkeypatch):
    from comfyui_octet.octet.modules import QuantConv2d

    g = torch.Generator(device="cuda").manual_seed(1)
    conv = torch.nn.Conv2d(64, 96, 3, padding=1, device="cuda", dtype=torch.bfloat16)
    sizes = [(2, 32, 32), (2, 32, 32), (1, 48, 40), (1, 48, 40), (2, 30, 34), (2, 30, 34), (2, 32, 32)]

    def run(env):
        monkeypatch.setenv("OCTET_FAST_LAUNCH", env)
        layer = QuantConv2d.from_float(conv, "dynamic", backend="triton")
        outs = []
        with torch.no_grad():
            for step, (n, h, w) in enumerate(sizes):
                x = torch.randn(n, 64, h, w, device="cuda", dtype=torch.bfloat16,
                                generator=torch.Generator(device="cuda").manual_seed(step))
                if step % 3 == 2:
                    x = x.contiguous(memory_format=torch.channels_last)
                outs.append(layer(x))
        return layer, outs

    _, through_triton = run("0")
    layer, direct = run("1")
    for step, (a, b) in enumerate(zip(through_triton, direct)):
        assert a.shape == b.shape and torch.equal(a, b), step
    convs = _prepared(layer)
    assert convs and all(c.launcher.direct and c.launcher.records and c.quantizer.quantize.records for c in convs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need compiled kernels (CUDA)")
@pytest.mark.parametrize("act", ["none", "dynamic"])
def test_planned_layer_after_an_offload_and_reload_reads_the_new_storage(act):
    """ComfyUI unloads a model to the CPU and loads it back with Module.to, which gives every Parameter new
    storage under the same object: the layer's kept plan (and the weight's TMA map kept by the direct C
    launch) must follow, not read the freed block (filled here with garbage before the second call)."""
    from comfyui_octet.octet.modules import QuantLinear

    g = torch.Generator(device="cuda").manual_seed(3)
    lin = torch.nn.Linear(512, 768, device="cuda", dtype=torch.bfloat16)
    layer = QuantLinear.from_float(lin, act, backend="triton")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        before = [layer(x) for _ in range(3)]               # plan, learn, direct launches
        layer.to("cpu")
        # Blocks the size of the freed weight, so the caching allocator hands the freed one out again.
        garbage = [torch.full((768, 512), 77, dtype=torch.int8, device="cuda") for _ in range(16)]
        layer.to("cuda")
        after = layer(x)
    del garbage
    assert torch.equal(before[-1], before[0]) and torch.equal(after, before[0])


# ---- a planned W8A8 layer's bound call (triton_backend._W8A8Linear._bind) --------------------------------

class _LoggingRecords(dict):
    """Every key has a learned record whose C launch logs its arguments (CPU: nothing is launched)."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def get(self, key, default=None):
        meta = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, PERSISTENT=True, ONE_TILE=True)
        return triton_launch.Record(None, 0, None, meta, (), lambda gx, gy, gz, stream, args:
                                    self.log.append((self.name, (gx, gy, gz), stream, key, args)))


def _aliasing(launches, x):
    """The launches with each tensor replaced by what a C launch reads of it (its address; here: size, dtype,
    contiguity, and which tensor: the n-th distinct address seen, or "x" for the input), so two calls compare
    equal when they pass the same arguments with the same aliasing (the quantizer's codes are the GEMM's)."""
    seen = {}

    def norm(a):
        if isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            if ptr == x.data_ptr():   # the input (the bound call passes it unreshaped: only its address counts)
                return "x"
            return ("T", a.numel(), a.dtype, a.is_contiguous(), seen.setdefault(ptr, len(seen)))
        if isinstance(a, triton_launch.Tma):
            return ("Tma", norm(a.base), a.shape, a.strides, a.block_shape, a.padding)
        return a if isinstance(a, (int, float, bool, str, type(None))) else ("obj", id(a))
    def facts(name, key):   # the quantizer's "on CUDA" fact: a bound call is made for CUDA only, these run on CPU
        device, facts = key
        return (device, facts[:1] + facts[2:]) if name == "quantize_rows" else key
    return [(name, grid, stream, facts(name, key), tuple(norm(a) for a in args))
            for name, grid, stream, key, args in launches]


@pytest.mark.skipif(not triton_support.interpreting(),
                    reason="plans the Triton backend for CPU tensors, which it does under TRITON_INTERPRET=1 only "
                           "(on a GPU the direct-launch tests above check the bound call's outputs)")
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_a_bound_call_launches_what_the_general_path_launches(act, monkeypatch):
    """The second call at an input's (shape, dtype, alignment) takes the bound call, which must hand both
    kernels the same arguments (values, shapes, strides, aliasing), grid, stream and key as ``_run``, while
    M, the input's alignment, its rank and the static scale's group change between calls."""
    from comfyui_octet.kernels.backends import scratch
    from comfyui_octet.octet.modules import QuantLinear
    from comfyui_octet.octet.timestep import GroupSelector

    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(64, 96), act, backend="triton")
    if act == "static":   # group slices of one tensor start 4 bytes apart: not all 16-byte aligned
        layer.set_static_scales(torch.tensor([0.03, 0.05, 0.02, 0.04]), GroupSelector(boundaries=[1.0, 2.0, 3.0]))
    big = torch.randn(300 * 64 + 8)
    log = []
    monkeypatch.setattr(scratch, "on_stream", lambda m, k, index, stream: None)   # CPU: fresh tensors, as _run
    plans = set()
    for step, (m, offset, group) in enumerate([(16, 0, 0), (16, 0, 1), (17, 2, 2), (16, 2, 3), (1, 0, 0),
                                               (300, 4, 1), (16, 0, 3), (17, 2, 2), (1, 0, 1)]):
        x = big[offset:offset + m * 64].view(m, 64) if step % 2 else big[offset:offset + m * 64].view(1, m, 64)
        if act == "static":
            layer.group_selector.index = group
        plan = layer.plan(x)
        run = plan.run
        if id(run) not in plans:
            plans.add(id(run))
            for launcher in (run.quantize.launcher, run.gemm.launcher):
                launcher.direct, launcher._stream, launcher._device = True, (lambda device: 77), (lambda: -1)
                launcher.records = _LoggingRecords(log, launcher.name)
        static = None if plan.scales is None else plan.scales[group]
        for _ in range(2):   # the first call at a key binds, the second takes the bound call
            del log[:]
            y_general = run._run(x, static)
            general = _aliasing(log, x)
            del log[:]
            y = run(x, static)
            assert _aliasing(log, x) == general, step
            assert y.shape == y_general.shape == (*x.shape[:-1], 96) and y.dtype == y_general.dtype
        key = (x.shape, x.dtype, x.data_ptr() % 16 == 0, static is None or static.data_ptr() % 16 == 0)
        assert run._bound[key], step
        assert [name for name, *_ in log] == ["quantize_rows", "w8a8_gemm"]

    # A strided input takes the general path and binds nothing; another current device than the one the
    # call was bound on (compiled kernels and the scratch belong to a device) too.
    run = layer.plan(big[:16 * 64].view(16, 64)).run
    bound_before, calls = dict(run._bound), []
    general_run = run._run
    monkeypatch.setattr(run, "_run", lambda x, s: calls.append(x.shape) or general_run(x, s))
    static = None if act == "dynamic" else layer.plan(big[:64].view(1, 64)).scales[0]
    run(big[:16 * 128].view(16, 128)[:, :64], static)
    assert run._bound == bound_before and calls == [(16, 64)]
    run.quantize.launcher._device = lambda: 3
    run(big[:16 * 64].view(16, 64), static)
    assert calls == [(16, 64), (16, 64)]


@pytest.mark.skipif(not triton_support.interpreting(),
                    reason="runs the weight-only plan's dequantize side on CPU tensors with a logging launcher "
                           "(on a GPU test_triton_w8a16 checks the bound call's numbers)")
def test_a_bound_weight_only_call_launches_what_the_general_path_launches(monkeypatch):
    """Weight-only at large M dequantizes the int8 weight (one launch) for cuBLAS; from the second call at an
    input's (shape, dtype) a bound call launches it. It must hand the kernel the same arguments (weight codes,
    scales, a fresh [N, K] output of the input's dtype, K), grid, stream and key as ``_run``, and fall back to
    ``_run`` on another current device; the fused kernel's side (small M) binds nothing."""
    from comfyui_octet.kernels.backends import scratch, triton_w8a16
    torch.manual_seed(0)
    qweight, w_scale = torch_ref.quantize_weight(torch.randn(96, 64))
    linear = triton_w8a16.W8A16Linear(qweight, w_scale, torch.randn(96))
    monkeypatch.setattr(linear, "_dequantizes", lambda x: x.shape[0] >= 1024)   # CPU tensors: as on CUDA
    monkeypatch.setattr(scratch, "weight_on_stream", lambda n, k, dtype, where, stream: None)   # fresh, as _run
    log = []
    launcher = linear.dequant
    launcher.direct, launcher._stream, launcher._device = True, (lambda device: 77), (lambda: -1)
    launcher.records = _LoggingRecords(log, launcher.name)
    for m, dtype in [(1024, torch.float32), (1030, torch.bfloat16), (1024, torch.float32), (1030, torch.float16)]:
        x = torch.randn(m, 64).to(dtype)
        for _ in range(2):   # the first call at a key binds, the second takes the bound call
            del log[:]
            y_general = linear._run(x)
            general = _aliasing(log, x)
            del log[:]
            y = linear(x)
            assert _aliasing(log, x) == general and len(general) == 1, (m, dtype)
            assert y.shape == y_general.shape == (m, 96) and y.dtype == y_general.dtype == dtype
        assert callable(linear._bound[(x.shape, dtype)])
        assert general[0][1] == (96, 1, 1) and general[0][4][1:] == (("T", 96, torch.float32, True, 1),
                                                                       ("T", 96 * 64, dtype, True, 2), 64)
    small = torch.randn(16, 64)
    del log[:]
    torch.testing.assert_close(linear(small), linear(small), rtol=0, atol=0)
    assert linear._bound[(small.shape, small.dtype)] is False and log == []

    calls = []
    general_run = linear._run
    monkeypatch.setattr(linear, "_run", lambda x: calls.append(x.shape) or general_run(x))
    launcher._device = lambda: 3
    linear(torch.randn(1024, 64))
    assert calls == [(1024, 64)]


class _DequantizingRecords(dict):
    """Every key has a learned record whose C launch does what the dequantize kernel does (CPU, by torch)."""

    def get(self, key, default=None):
        def launch(gx, gy, gz, stream, args):
            q, scale, w, _ = args
            w.copy_(q.float() * scale.float().reshape(-1, 1))
        return triton_launch.Record(None, 0, None, dict(BLOCK_N=8, BLOCK_K=64), (), launch)


@pytest.mark.skipif(not triton_support.interpreting(),
                    reason="plans weight-only for CPU tensors, which it does under TRITON_INTERPRET=1 only")
def test_a_bound_weight_only_call_dequantizes_into_the_streams_scratch_unless_autograd_keeps_the_weight(monkeypatch):
    """The bound call's float weight comes from the stream's scratch (scratch.weight_on_stream, asked with the
    layer's N, K, the input's dtype and device, and the launch's stream) and cuBLAS reads what the kernel wrote
    there: layer after layer sharing one buffer, outputs equal x @ dequantized weight + bias. An input that
    needs grad gets a fresh weight (autograd keeps it for backward; the next layer would overwrite the scratch)."""
    from comfyui_octet.kernels.backends import scratch, triton_w8a16
    torch.manual_seed(0)
    shared = torch.empty(96 * 64)
    asked = []

    def weight_on_stream(n, k, dtype, where, stream):
        asked.append((n, k, dtype, where.type, stream))
        return shared[:n * k].view(n, k)
    monkeypatch.setattr(scratch, "weight_on_stream", weight_on_stream)
    layers, expected = [], []
    x = torch.randn(1024, 64)
    for n in (96, 80):
        qweight, w_scale = torch_ref.quantize_weight(torch.randn(n, 64))
        bias = torch.randn(n)
        linear = triton_w8a16.W8A16Linear(qweight, w_scale, bias)
        monkeypatch.setattr(linear, "_dequantizes", lambda x: x.shape[0] >= 1024)
        launcher = linear.dequant
        launcher.direct, launcher._stream, launcher._device = True, (lambda device: 77), (lambda: -1)
        launcher.records = _DequantizingRecords()
        layers.append(linear)
        expected.append(x @ (qweight.float() * w_scale.float().reshape(-1, 1)).T + bias)
        linear(x)   # the first call at this key runs the general path and binds
    assert asked == []
    for i in (0, 1, 0, 1):
        shared.fill_(float("nan"))
        torch.testing.assert_close(layers[i](x), expected[i], rtol=1e-5, atol=1e-5)
        assert asked[-1] == ((96, 80)[i], 64, torch.float32, "cpu", 77)
    assert len(asked) == 4
    shared.fill_(float("nan"))
    with torch.enable_grad():
        y = layers[0](x.clone().requires_grad_(True))
    assert len(asked) == 4 and y.requires_grad
    torch.testing.assert_close(y.detach(), expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_support.interpreting(),
                    reason="runs the dequantize kernel on CPU tensors (interpreter); on a GPU the [none] case of "
                           "test_planned_layer_launches_direct_and_equals_tritons_own_path_on_changing_inputs covers it")
def test_weight_only_with_direct_launches_off_binds_nothing_and_keeps_the_general_paths_numbers(monkeypatch):
    """OCTET_FAST_LAUNCH=0, the interpreter, or a Triton whose internals differ: the dequantize launcher has no
    direct launches (and no device to ask). Weight-only at large M must then run the general path on every call
    (it raised AttributeError there once, on an H200 with OCTET_FAST_LAUNCH=0)."""
    from comfyui_octet.kernels.backends import triton_w8a16
    monkeypatch.setenv("OCTET_FAST_LAUNCH", "0")
    torch.manual_seed(0)
    qweight, w_scale = torch_ref.quantize_weight(torch.randn(24, 64))
    bias = torch.randn(24)
    linear = triton_w8a16.W8A16Linear(qweight, w_scale, bias)
    assert not linear.dequant.direct
    ran = []
    general_run = linear._run
    monkeypatch.setattr(linear, "_run", lambda x: ran.append(x.shape) or general_run(x))
    monkeypatch.setattr(linear, "_dequantizes", lambda x: x.shape[0] >= 1024)
    x = torch.randn(1024, 64)
    expected = x @ (qweight.float() * w_scale.float().reshape(-1, 1)).T + bias
    for _ in range(3):
        torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-4)
    assert ran == [(1024, 64)] * 3 and linear._bound[(x.shape, x.dtype)] is False


def test_tuning_without_room_for_tritons_flush_buffer_times_with_a_small_one_said_once(monkeypatch, caplog):
    """Triton's tuning zeroes a 256 MiB buffer before each timed run: on a card with less left, the allocation
    must not fail the user's prompt (SDXL's graph warm-up, 2.5 GiB free, H200). Timed again with a small buffer,
    the driver's own method back afterwards; an out-of-memory error of the kernel itself still propagates."""
    from types import SimpleNamespace

    import triton
    import triton.testing

    from comfyui_octet.kernels import registry

    class Driver:
        def get_empty_cache_for_benchmark(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
    driver = Driver()
    small = torch.zeros(4, dtype=torch.int32)
    monkeypatch.setattr(triton.runtime, "driver", SimpleNamespace(active=driver))
    monkeypatch.setattr(triton_support, "small_flush_buffer", lambda: small)
    monkeypatch.setattr(registry, "_logged", set())
    buffers = []

    def do_bench(fn, warmup, rep, quantiles):
        buffers.append(triton.runtime.driver.active.get_empty_cache_for_benchmark())   # as Triton's does
        fn()
        return [1.0, 0.9, 1.1]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    ran = []
    with caplog.at_level(logging.WARNING, logger="octet"):
        for _ in range(2):
            assert triton_support.tuning_bench(lambda: ran.append(1), (0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert buffers == [small, small] and len(ran) == 2
    assert "get_empty_cache_for_benchmark" not in vars(driver)          # the method is the class's again
    assert len([r for r in caplog.records if "256 MiB cache-flush buffer" in r.getMessage()]) == 1

    def kernel_out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: fn())
    with pytest.raises(torch.OutOfMemoryError, match="2.00 GiB"):
        triton_support.tuning_bench(kernel_out_of_memory, None)
    assert "get_empty_cache_for_benchmark" not in vars(driver)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real out-of-memory needs a GPU")
def test_gpu_tuning_times_with_a_small_flush_buffer_when_the_card_has_less_than_256_mib_free(monkeypatch, caplog):
    """The real driver and do_bench: with ~96 MiB free, Triton's flush buffer cannot be allocated; tuning still
    returns timings, and the card is usable afterwards."""
    from comfyui_octet.kernels import registry
    monkeypatch.setattr(registry, "_logged", set())
    torch.cuda.empty_cache()
    x = torch.zeros(1 << 20, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free - (96 << 20), dtype=torch.uint8, device="cuda")
    try:
        with caplog.at_level(logging.WARNING, logger="octet"):
            times = triton_support.tuning_bench(lambda: x.add_(1.0), (0.5, 0.2, 0.8))
    finally:
        del filler
        torch.cuda.empty_cache()
    assert len(times) == 3 and all(0 < t < 10 for t in times), times
    assert len([r for r in caplog.records if "256 MiB cache-flush buffer" in r.getMessage()]) == 1
    assert x[0].item() > 0


def test_a_plans_bound_call_does_not_keep_the_plan_alive(monkeypatch):
    """A plan keeps the bound call it makes after its first call at an input; the call must not hold the plan in
    return, or the two form a cycle that only the cyclic garbage collector frees: a plan made for one call (a layer
    streamed from RAM, octet/modules.py) then kept its weight's device copy until a collection ran (Flux-dev, H200,
    2026-12-04). On a CPU no call is bound, so the CUDA-only parts are stood in for."""
    import gc
    import weakref
    from types import SimpleNamespace

    from comfyui_octet.kernels.backends import triton_backend, triton_w8a16
    launcher = SimpleNamespace(current_device=lambda: -1, stream=lambda device: None,
                               learned=lambda key: SimpleNamespace(meta={}, c_launch=lambda *a: None))
    quant = SimpleNamespace(RowQuantizer=lambda k, smooth: SimpleNamespace(bound=lambda *a: (lambda *b: None),
                                                                           launcher=launcher),
                            GeluRowQuantizer=None, NormRowQuantizer=None)
    gemm = SimpleNamespace(W8A8Gemm=lambda q, s, b, **kw: SimpleNamespace(bound=lambda *a: (lambda *b: None)))
    weight = torch.zeros(64, 32, dtype=torch.int8)
    ops = SimpleNamespace(k=32, n=64, smooth=None, qweight=weight, scale=torch.ones(64), bias=None)
    x = torch.zeros(4, 32)
    was_enabled = gc.isenabled()
    gc.disable()            # only reference counting frees what is dropped below
    try:
        plan = triton_backend._W8A8Linear(quant, gemm, ops)
        key = (x.shape, x.dtype, True, True)
        plan._bind(key, x, None)
        assert callable(plan._bound[key])                     # a call was bound
        gone = weakref.ref(plan)
        del plan
        assert gone() is None

        linear = triton_w8a16.W8A16Linear(weight, torch.ones(64), None)
        monkeypatch.setattr(linear, "_dequantizes", lambda x2d: True)
        monkeypatch.setattr(linear, "dequant", launcher)
        monkeypatch.setattr(linear, "_dequant_grid", lambda meta: (1, 1))
        linear._bind((x.shape, x.dtype), x)
        assert callable(linear._bound[(x.shape, x.dtype)])
        gone = weakref.ref(linear)
        monkeypatch.undo()
        del linear
        assert gone() is None
    finally:
        if was_enabled:
            gc.enable()
