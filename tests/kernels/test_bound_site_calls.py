"""Call sites' bound calls: the fused GroupNorm (+ SiLU) and GEGLU gate of float_fusions, and the INT8 conv.

After the first call at an input's key a site calls the learned C launchers directly (kernels/backends/
triton_groupnorm.py ``GroupNorm``). On CPU there are no compiled launchers, so a stand-in learns each key at
Triton's first launch (here: the interpreter's) and its "C launch" runs the same kernel through the interpreter
with the arguments it is handed and logs them: the bound call must launch what the general path launches (same
arguments, aliasing, grid, stream and key) and give its numbers bit for bit, while shapes, alignments and dtypes
change between calls; and it must step aside on another current device. On a GPU the real launchers run
(test_triton_groupnorm, test_triton_geglu, test_triton_conv: the same sites called repeatedly).
"""
from __future__ import annotations

import types

import pytest
import torch

from comfyui_octet.kernels import torch_ref
from comfyui_octet.kernels.backends import triton_launch, triton_support
from kernel_testing import randn

interpreter_only = pytest.mark.skipif(
    not triton_support.interpreting() or triton_support.unavailable_reason() is not None,
    reason="stand-in launchers over Triton's CPU interpreter (TRITON_INTERPRET=1)")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or triton_support.interpreting(),
                              reason="the compiled launchers: a GPU")


def _tensor_ids(args, inputs):
    """Each tensor argument as what a C launch reads of it: an input's name, or (numel, dtype, the n-th new
    address), so two calls compare equal when they pass the same arguments with the same aliasing."""
    seen = {}

    def norm(a):
        if isinstance(a, torch.Tensor):
            for name, t in inputs.items():
                if t is not None and a.data_ptr() == t.data_ptr() and a.dtype == t.dtype:
                    return name
            return ("T", a.numel(), a.dtype, seen.setdefault(a.data_ptr(), len(seen)))
        return a
    return tuple(norm(a) for a in args)


@pytest.fixture
def learning(monkeypatch):
    """``make(launcher)``: the launcher takes direct launches on device -1 (a CPU tensor's ``get_device()``),
    stream 77, and learns every key with a record whose C launch runs the kernel (interpreter) and logs
    (name, grid, stream, key, args). Returns the log."""
    log = []
    monkeypatch.setattr(triton_launch, "_shared", {})

    def learn(self, key, args, flags, build, grid):
        config = getattr(self.kernel, "best_config", None) if self.autotuned else None
        kwargs, meta = dict(flags), dict(flags)
        if config is not None:   # the autotuner's choice: its tile sizes are what grid() and build() read
            kwargs.update(config.all_kwargs())
            meta.update(config.kwargs)
        jit, name = self.jit, self.name

        def c_launch(gx, gy, gz, stream, args):
            log.append((name, (gx, gy, gz), stream, key, args))
            jit[(gx, gy, gz)](*args, **kwargs)
        self.records[key] = triton_launch.Record(None, 0, None, meta, (), c_launch)

    def make(launcher):
        launcher.direct, launcher._stream, launcher._device = True, (lambda device: 77), (lambda: -1)
        launcher._learn = types.MethodType(learn, launcher)
        return launcher
    return make, log


def _same(a, b) -> bool:
    """Bit-for-bit equal outputs: a tensor, or a tuple of tensors and Nones (triton_rope.QKVHeads)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _check_bound(site, inputs_of, calls, log, names):
    """For each argument tuple: the general path, then the site twice (binds, then bound): same numbers and the
    same launches."""
    for args in calls:
        inputs = inputs_of(*args)
        site.run(*args)   # a launch key's first call goes through Triton (here: the interpreter) and learns it
        del log[:]
        general = site.run(*args)
        general_log = [(n, g, s, k, _tensor_ids(a, inputs)) for n, g, s, k, a in log]
        assert [entry[0] for entry in general_log] == (names(*args) if callable(names) else names)
        for _ in range(2):
            del log[:]
            out = site(*args)
            assert _same(out, general)
            assert [(n, g, s, k, _tensor_ids(a, inputs)) for n, g, s, k, a in log] == general_log
        assert callable(site._calls[next(reversed(site._calls))])


@interpreter_only
def test_a_group_norm_sites_bound_call_launches_what_the_general_path_launches(learning, rng):
    from comfyui_octet.kernels.backends import triton_groupnorm as gn
    make, log = learning
    make(triton_launch.shared(gn._gn_stats_kernel, "group_norm_stats"))
    make(triton_launch.shared(gn._gn_apply_kernel, "group_norm_apply"))
    big = randn((2 * 64 * 12 * 10 + 8,), rng)
    w, b = 1 + 0.3 * randn((64,), rng), 0.2 * randn((64,), rng)
    for silu in (False, True):
        site = gn.GroupNorm(32, 1e-5, silu, config=(64, 256, 4))
        calls = [(big[:2 * 64 * 12 * 10].view(2, 64, 12, 10), w, b),
                 (big[1:1 + 64 * 12 * 10].view(1, 64, 12, 10), w, b),        # another shape, not 16-byte aligned
                 (big[4:4 + 64 * 12 * 10].view(1, 64, 12, 10), None, None),  # 16-byte aligned, no affine
                 (big[:2 * 64 * 12 * 10].view(2, 64, 12, 10), w, b)]         # the first key again
        _check_bound(site, lambda x, w, b: {"x": x, "w": w, "b": b}, calls, log,
                     ["group_norm_stats", "group_norm_apply"])
        x = calls[0][0]
        torch.testing.assert_close(site(x, w, b), torch_ref.group_norm_silu(x, 32, w, b, 1e-5, silu=silu),
                                   rtol=1e-5, atol=1e-5)

    # Inputs the kernels do not take: None (the caller runs the host's ops), remembered for the key.
    strided = big[:2 * 64 * 12 * 10].view(2, 64, 10, 12).transpose(2, 3)
    assert site(strided, w, b) is None and site._calls[next(reversed(site._calls))] is triton_launch.DECLINED
    assert site(strided, w, b) is None
    # Another current device than the one a call was bound on: the general path (same numbers).
    x = calls[0][0]
    ran = []
    general = site.run
    site.run = lambda *a: ran.append(1) or general(*a)
    for launcher in triton_launch._shared.values():
        launcher._device = lambda: 3
    site(x, w, b)
    assert ran == [1]


@interpreter_only
def test_a_geglu_sites_bound_call_launches_what_the_general_path_launches(learning, rng):
    from comfyui_octet.kernels.backends import triton_geglu
    make, log = learning
    make(triton_launch.shared(triton_geglu._geglu_kernel, "geglu"))
    site = triton_geglu.Geglu(config=(64, 4))
    big = randn((3 * 7 * 40 + 8,), rng)
    calls = [(big[:3 * 7 * 40].view(3, 7, 40),), (big[1:1 + 5 * 40].view(5, 40),),
             (big[4:4 + 9 * 40].view(1, 9, 40).to(torch.float16),), (big[:3 * 7 * 40].view(3, 7, 40),)]
    _check_bound(site, lambda h: {"h": h}, calls, log, ["geglu"])
    h = calls[0][0]
    torch.testing.assert_close(site(h), torch_ref.geglu(h), rtol=1e-5, atol=1e-6)
    assert site(big[:3 * 80].view(3, 80)[:, ::2]) is None    # strided: the host's ops
    assert site(big[:3 * 5 * 41].view(3, 5, 41)) is None     # odd width: the host's ops


@interpreter_only
@pytest.mark.parametrize("with_v", [True, False])
def test_a_qkv_heads_sites_bound_call_launches_what_the_general_path_launches(learning, rng, with_v):
    """SD3's q/k/v preparation: one launch per stream (context, image), their grids, token offsets and strides
    fixed per key; the last image stream is a strided view (its rows 2 apart)."""
    from comfyui_octet.kernels.backends import triton_rope
    make, log = learning
    make(triton_launch.shared(triton_rope._qkv_heads_kernel, "qkv_heads"))
    h, d = 3, 8
    site = triton_rope.QKVHeads(h, with_v, config=(4, 2, 4))
    w = [1 + 0.3 * randn((d,), rng) for _ in range(4)]
    big = randn((2 * 23 * 3 * h * d + 8,), rng)

    def stream(offset, b, length, step=1):
        return big[offset:offset + b * length * step * 3 * h * d].view(b, length * step, 3 * h * d)[:, ::step]
    calls = [((stream(0, 2, 5), w[0], w[1], 1e-6, 1e-6), (stream(400, 2, 11), w[2], w[3], 1e-6, 1e-6)),
             ((stream(1, 1, 7), w[0], w[1], 1e-6, 1e-6), (stream(200, 1, 9), w[2], w[3], 1e-5, 1e-6)),
             ((stream(4, 2, 9, 2), w[2], w[3], 1e-6, 1e-6),),
             ((stream(0, 2, 5), w[0], w[1], 1e-6, 1e-6), (stream(400, 2, 11), w[2], w[3], 1e-6, 1e-6))]
    _check_bound(site, lambda segments: {f"{name}{i}": s[j] for i, s in enumerate(segments)
                                         for j, name in enumerate(("x", "wq", "wk"))},
                 [(c,) for c in calls], log, lambda segments: ["qkv_heads"] * len(segments))
    # Against the host's ops: split_qkv, rms_norm over each head with its stream's weight, the streams' cat.
    segments = calls[1]
    q, k, v = site(segments)
    parts = [x.reshape(*x.shape[:2], 3, h, d).movedim(2, 0) for x, *_ in segments]
    ref_q = torch.cat([torch.nn.functional.rms_norm(p[0], (d,), s[1], s[3]) for p, s in zip(parts, segments)], 1)
    ref_k = torch.cat([torch.nn.functional.rms_norm(p[1], (d,), s[2], s[4]) for p, s in zip(parts, segments)], 1)
    torch.testing.assert_close(q, ref_q.reshape(q.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k.reshape(k.shape), rtol=1e-5, atol=1e-5)
    assert (v is None) if not with_v else torch.equal(v, torch.cat([p[2] for p in parts], 1))
    # A head width the kernel does not take (not a power of two): None, remembered for the key.
    odd = ((big[:2 * 5 * 3 * h * 6].view(2, 5, 3 * h * 6), w[0][:6], w[1][:6], 1e-6, 1e-6),)
    assert site(odd) is None and site._calls[next(reversed(site._calls))] is triton_launch.DECLINED


@interpreter_only
@pytest.mark.parametrize("static", [False, True])
def test_an_int8_convs_bound_call_launches_what_the_general_path_launches(learning, rng, static):
    """Three launches (the per-sample absmax, the quantizer, the conv; a static scale skips the absmax) with their
    grids and integer arguments fixed per input shape; C = 64 takes the weight through its TMA descriptor."""
    from comfyui_octet.kernels.backends import triton_conv
    make, log = learning
    qweight, w_scale = torch_ref.quantize_weight(randn((32, 64 * 9), rng))
    conv = triton_conv.ConvW8A8(qweight.view(32, 64, 3, 3), w_scale, randn((32,), rng), 1, 1, 1, 1, None)
    assert conv.w_tma
    for launcher in (conv.quantizer.absmax, conv.quantizer.quantize, conv.launcher):
        make(launcher)
    big = randn((2 * 64 * 6 * 5 + 8,), rng)
    scales = torch.tensor([0.02, 0.03, 0.05])     # slices start 4 bytes apart: not all 16-byte aligned
    calls = [(big[:64 * 6 * 5].view(1, 64, 6, 5), scales[0:1] if static else None),
             (big[1:1 + 2 * 64 * 6 * 5].view(2, 64, 6, 5), scales[1:2] if static else None),
             (big[4:4 + 64 * 5 * 6].view(1, 64, 5, 6), scales[2:3] if static else None),
             (big[:64 * 6 * 5].view(1, 64, 6, 5), scales[1:2] if static else None)]
    names = (["quantize_nchw_to_nhwc"] if static else ["sample_absmax", "quantize_nchw_to_nhwc"]) + ["conv2d_w8a8"]
    _check_bound(conv, lambda x, s: {"x": x, "s": s, "w": conv.w_scale, "b": conv.bias}, calls, log, names)
    # Against the reference: the same integers, the fp32 epilogue rounded once.
    x, s = calls[1]
    xq, xs = torch_ref.quantize_per_sample(x) if not static else (None, None)
    y = conv(x, s)
    w = qweight.view(32, 64, 3, 3).float() * w_scale.view(32, 1, 1, 1)
    if static:
        xr = torch.clamp(torch.round(x / s), -127, 127) * s
    else:
        xr = xq.float() * xs.view(-1, 1, 1, 1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(xr, w, conv.bias, 1, 1), rtol=1e-4, atol=1e-4)
    # Channels-last and strided inputs take the general path (and bind nothing).
    cl = calls[0][0].contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(cl, calls[0][1]), conv.run(calls[0][0], calls[0][1]), rtol=0, atol=0)
    assert conv._calls[next(reversed(conv._calls))] is False


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_sites_bound_calls_give_the_general_paths_numbers_on_changing_inputs(dtype, rng):
    """On a GPU, with Triton's real compiled launchers: each site's second and later calls at a key take the bound
    call (checked), on fresh inputs every call, and equal the general path bit for bit; outputs are compared after
    every call was issued (a bound call that reused a buffer would show)."""
    from comfyui_octet.kernels.backends import triton_conv, triton_geglu, triton_groupnorm, triton_rope
    qweight, w_scale = torch_ref.quantize_weight(randn((64, 64 * 9), rng))
    w, b = 1 + 0.3 * randn((64,), rng, device="cuda"), 0.2 * randn((64,), rng, device="cuda")
    wd, bd = w.to(dtype), b.to(dtype)     # one weight tensor: a weight's address is part of a site's key
    sites = [(triton_groupnorm.GroupNorm(32, 1e-5, True), lambda: (randn((2, 64, 16, 12), rng, dtype, "cuda"), wd, bd)),
             (triton_geglu.Geglu(), lambda: (randn((1, 77, 128), rng, dtype, "cuda"),)),
             (triton_conv.ConvW8A8(qweight.view(64, 64, 3, 3).cuda(), w_scale.cuda(), b, 1, 1, 1, 1, None),
              lambda: (randn((2, 64, 16, 12), rng, dtype, "cuda"), None)),
             (triton_rope.QKVHeads(4), lambda: (((randn((2, 77, 3 * 256), rng, dtype, "cuda"), wd, bd, 1e-6, 1e-6),
                                                 (randn((2, 256, 3 * 256), rng, dtype, "cuda"), bd, wd, 1e-6, 1e-6)),))]
    for site, make in sites:
        inputs = [make() for _ in range(4)]
        outs = [site(*args) for args in inputs]
        assert sum(callable(call) for call in site._calls.values()) == 1, type(site).__name__
        for args, out in zip(inputs, outs):
            assert _same(out, site.run(*args)), type(site).__name__
