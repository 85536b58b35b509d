"""scratch: one buffer per (device, stream, thread) for a layer's codes and scales, views kept per (M, K),
never while a CUDA graph is captured, never above the size limit. The bookkeeping runs on CPU with the
CUDA pieces stood in (allocations on CPU, stream handles from a counter); the GPU tests of planned layers
(test_triton_launch.py) run the real thing against Triton's own path."""
from __future__ import annotations

import threading

import pytest
import torch

from comfyui_octet.kernels.backends import scratch

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def stand_in(monkeypatch):
    streams = {"current": 11}
    allocations = []

    def allocate(size, rows, device):
        allocations.append((size, rows))
        return torch.empty(size, dtype=torch.int8), torch.empty(rows, dtype=torch.float32)
    monkeypatch.setattr(scratch, "_allocate", allocate)
    monkeypatch.setattr(scratch, "_raw_stream", lambda index: streams["current"] + index)
    monkeypatch.setattr(scratch, "_capturing", lambda: False)
    scratch.release()
    yield streams, allocations
    scratch.release()


def test_views_are_reused_per_shape_and_the_buffer_grows_but_never_shrinks(stand_in):
    _, allocations = stand_in
    q, s = scratch.codes_and_scales(16, 64, CUDA0)
    assert q.shape == (16, 64) and q.dtype == torch.int8 and s.shape == (16,) and s.dtype == torch.float32
    again = scratch.codes_and_scales(16, 64, CUDA0)
    assert again[0] is q and again[1] is s and allocations == [(1024, 16)]
    small = scratch.codes_and_scales(4, 32, CUDA0)          # fits: a view of the same storage, no allocation
    assert small[0].data_ptr() == q.data_ptr() and allocations == [(1024, 16)]
    big = scratch.codes_and_scales(64, 64, CUDA0)            # grows to the larger size
    assert allocations[-1] == (4096, 64) and big[0].shape == (64, 64)
    after = scratch.codes_and_scales(16, 64, CUDA0)          # old views dropped with the old storage
    assert after[0] is not q and after[0].data_ptr() == big[0].data_ptr() != q.data_ptr()


def test_other_streams_and_threads_get_their_own_buffers(stand_in):
    streams, _ = stand_in
    a = scratch.codes_and_scales(8, 16, CUDA0)[0]
    streams["current"] = 99
    b = scratch.codes_and_scales(8, 16, CUDA0)[0]
    assert b.data_ptr() != a.data_ptr()
    got = []
    thread = threading.Thread(target=lambda: got.append(scratch.codes_and_scales(8, 16, CUDA0)[0]))
    thread.start()
    thread.join()
    assert got[0].data_ptr() not in (a.data_ptr(), b.data_ptr())


def test_none_while_capturing_above_the_limit_and_off_cuda(stand_in, monkeypatch):
    assert scratch.codes_and_scales(8, 16, torch.device("cpu")) is None
    limit_rows = scratch.LIMIT_BYTES // 1024
    assert scratch.codes_and_scales(limit_rows, 1024, CUDA0) is not None
    assert scratch.codes_and_scales(limit_rows + 1, 1024, CUDA0) is None
    monkeypatch.setattr(scratch, "_capturing", lambda: True)
    assert scratch.codes_and_scales(8, 16, CUDA0) is None


def test_the_views_kept_per_buffer_are_bounded(stand_in):
    for m in range(1, 3 * scratch._MAX_VIEWS):
        scratch.codes_and_scales(m, 16, CUDA0)
    (buf,) = scratch._buffers.values()
    assert len(buf.views) <= scratch._MAX_VIEWS


def test_buffers_of_streams_that_came_and_went_are_bounded(stand_in):
    streams, _ = stand_in
    for stream in range(3 * scratch._MAX_BUFFERS):
        streams["current"] = 1000 + stream
        scratch.codes_and_scales(8, 16, CUDA0)
    assert len(scratch._buffers) <= scratch._MAX_BUFFERS


def test_the_switch_is_read_from_the_environment_on_request(stand_in, monkeypatch):
    monkeypatch.setenv("OCTET_SCRATCH", "0")
    scratch.read_environment()
    try:
        assert scratch.codes_and_scales(8, 16, CUDA0) is None
    finally:
        monkeypatch.delenv("OCTET_SCRATCH")
        scratch.read_environment()
    assert scratch.ENABLED and scratch.codes_and_scales(8, 16, CUDA0) is not None


def test_float_weights_have_their_own_buffer_per_stream_and_dtype(stand_in, monkeypatch):
    """weight_on_stream (weight-only's dequantized weight): views kept per (N, K), one buffer per (device,
    stream, thread, dtype) that grows and never shrinks, None while capturing, above the limit or switched off."""
    made = []

    def allocate_weight(numel, dtype, device):
        made.append((numel, dtype))
        return torch.empty(numel, dtype=dtype)
    monkeypatch.setattr(scratch, "_allocate_weight", allocate_weight)
    w = scratch.weight_on_stream(96, 64, torch.bfloat16, CUDA0, 5)
    assert w.shape == (96, 64) and w.dtype == torch.bfloat16 and w.is_contiguous()
    assert scratch.weight_on_stream(96, 64, torch.bfloat16, CUDA0, 5) is w and made == [(96 * 64, torch.bfloat16)]
    smaller = scratch.weight_on_stream(32, 64, torch.bfloat16, CUDA0, 5)     # a view of the same storage
    assert smaller.data_ptr() == w.data_ptr() and len(made) == 1
    other = scratch.weight_on_stream(32, 64, torch.float16, CUDA0, 5)        # another dtype, another buffer
    elsewhere = scratch.weight_on_stream(32, 64, torch.bfloat16, CUDA0, 6)   # another stream, another buffer
    assert len({w.data_ptr(), other.data_ptr(), elsewhere.data_ptr()}) == 3
    bigger = scratch.weight_on_stream(128, 64, torch.bfloat16, CUDA0, 5)
    assert made[-1] == (128 * 64, torch.bfloat16) and scratch.weight_on_stream(96, 64, torch.bfloat16, CUDA0, 5) \
        .data_ptr() == bigger.data_ptr()
    rows = scratch.LIMIT_BYTES // (1024 * 2)
    assert scratch.weight_on_stream(rows, 1024, torch.bfloat16, CUDA0, 5) is not None
    assert scratch.weight_on_stream(rows + 1, 1024, torch.bfloat16, CUDA0, 5) is None
    assert scratch.weight_on_stream(rows, 1024, torch.float32, CUDA0, 5) is None   # 4-byte elements
    monkeypatch.setattr(scratch, "ENABLED", False)
    assert scratch.weight_on_stream(8, 8, torch.bfloat16, CUDA0, 5) is None
    monkeypatch.setattr(scratch, "ENABLED", True)
    monkeypatch.setattr(scratch, "_capturing", lambda: True)
    assert scratch.weight_on_stream(8, 8, torch.bfloat16, CUDA0, 5) is None
    monkeypatch.setattr(scratch, "_capturing", lambda: False)
    for stream in range(3 * scratch._MAX_BUFFERS):
        scratch.weight_on_stream(8, 8, torch.bfloat16, CUDA0, 100 + stream)
    assert len(scratch._weights) <= scratch._MAX_BUFFERS
    scratch.release()
    assert scratch._weights == {}
