"""Streamed layers' copies made one call ahead (octet/stream_ahead.py): the order learnt, the copy taken only by the
layer and weight it was made from, dropped otherwise. The CUDA stream and event are CPU stand-ins here; the GPU
test in tests/nodes/test_dynamic_vram.py runs the real ones."""
import pytest
import torch
import torch.nn as nn

from comfyui_octet.kernels.operands import Int8Operands
from comfyui_octet.octet import stream_ahead
from comfyui_octet.octet.modules import QuantLinear


class _Launched(list):
    """The layers copied ahead, in order; ``waited``: the copies the compute stream waited for (before using a copy
    taken, or before a dropped one's memory went back)."""
    waited: list


@pytest.fixture
def ahead(monkeypatch):
    launched = _Launched()

    def launch(layer, device):              # a copy, as the copy stream's is: the layer's tensors stay its own
        launched.append(layer)
        ops = layer.operands(device)
        return Int8Operands(*(None if t is None else t.clone() for t in (ops.qweight, ops.scale, ops.bias))), "ready"

    monkeypatch.setattr(stream_ahead, "_successor", stream_ahead.weakref.WeakKeyDictionary())
    monkeypatch.setattr(stream_ahead, "_last", None)
    monkeypatch.setattr(stream_ahead, "_pending", stream_ahead.collections.deque())
    monkeypatch.setattr(stream_ahead, "AHEAD", 2)
    monkeypatch.setattr(stream_ahead, "stats", {"ahead": 0, "missed": 0})
    monkeypatch.setattr(stream_ahead, "_streams_usable", lambda device: True)
    monkeypatch.setattr(stream_ahead, "_streamed_from_pinned_ram", lambda layer: True)
    monkeypatch.setattr(stream_ahead, "_launch", launch)
    monkeypatch.setattr(stream_ahead, "_after_copy", lambda ready, device: launched.waited.append(ready))
    launched.waited = []
    return launched


def _layers(n):
    torch.manual_seed(0)
    return [QuantLinear.from_float(nn.Linear(32, 16), "dynamic") for _ in range(n)]


def _same(ops, want):
    torch.testing.assert_close(ops.qweight, want.qweight, rtol=0, atol=0)
    torch.testing.assert_close(ops.scale, want.scale, rtol=0, atol=0)
    torch.testing.assert_close(ops.bias, want.bias, rtol=0, atol=0)


def _pending():
    return [a.layer() for a in stream_ahead._pending]


def test_later_steps_take_the_copies_made_at_the_streamed_calls_before(ahead):
    a, b, c = layers = _layers(3)
    cpu = torch.device("cpu")
    for layer in layers:                    # the first step learns the order: nothing to copy ahead yet
        _same(stream_ahead.operands(layer, cpu), layer.operands(cpu))
    assert ahead == [] and stream_ahead.stats == {"ahead": 0, "missed": 0}
    for step in range(2):
        for layer in layers:
            _same(stream_ahead.operands(layer, cpu), layer.operands(cpu))
    # Two ahead: a's call in the second step copies b and c, b's then a (for the third step), c's b, ...
    assert ahead == [b, c, a, b, c, a, b]
    assert stream_ahead.stats == {"ahead": 5, "missed": 0}
    assert _pending() == [a, b]                              # ready for the next step's first calls
    stream_ahead.drop()
    assert _pending() == [] and stream_ahead.stats["missed"] == 2


def test_copies_ahead_stop_at_the_byte_limit_beyond_the_first(ahead, monkeypatch):
    layers = _layers(4)
    cpu = torch.device("cpu")
    size = layers[0].weight.nbytes
    monkeypatch.setattr(stream_ahead, "AHEAD", 3)
    monkeypatch.setattr(stream_ahead, "AHEAD_BYTES", 2 * size)
    for layer in layers + layers[:1]:
        stream_ahead.operands(layer, cpu)
    assert _pending() == layers[1:3]
    monkeypatch.setattr(stream_ahead, "AHEAD_BYTES", size // 2)   # one layer ahead whatever its size
    stream_ahead.drop()
    stream_ahead.operands(layers[1], cpu)
    assert _pending() == layers[2:3]


def test_a_copy_for_another_layer_or_an_older_weight_is_dropped_and_the_call_copies_its_own(ahead):
    a, b, c = _layers(3)
    cpu = torch.device("cpu")
    for layer in (a, b, a, b):
        stream_ahead.operands(layer, cpu)
    assert _pending() == [a]                                 # b would be next after a: b is the one calling
    assert ahead.waited == ["ready"]                         # b took its copy: the compute stream waits for it
    # Another order (c after b): the copy of a is dropped, c copies its own; b's successor is now c.
    _same(stream_ahead.operands(c, cpu), c.operands(cpu))
    assert stream_ahead.stats["missed"] == 1 and stream_ahead._successor[b]() is c
    # The dropped copy's memory (allocated on the compute stream) goes back only after the copy into it is done.
    assert ahead.waited == ["ready", "ready"]
    stream_ahead.operands(b, cpu)                            # copies c ahead (c's successor is not known)
    assert _pending() == [c]
    with torch.no_grad():
        c.weight.neg_()                                      # written in place (a LoRA merged) after the copy
    stale = stream_ahead._pending[0].operands.qweight
    ops = stream_ahead.operands(c, cpu)
    assert stream_ahead.stats["missed"] == 2
    _same(ops, c.operands(cpu))                              # the new weight, not the copy of the old one
    assert torch.equal(stale, -ops.qweight) and ops.qweight.abs().sum() > 0


def test_nothing_is_copied_ahead_off_the_gpu_or_for_graph_work(monkeypatch):
    from comfyui_octet.kernels.dispatch import graph_plans
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not stream_ahead._streams_usable(torch.device("cpu"))
    assert stream_ahead._streams_usable(torch.device("cuda", 0))
    with graph_plans():
        assert not stream_ahead._streams_usable(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not stream_ahead._streams_usable(torch.device("cuda", 0))
    layer = _layers(1)[0]
    assert not stream_ahead._streamed_from_pinned_ram(layer)      # pageable RAM: a copy would hold up the host


def test_no_room_for_a_copy_ahead_copies_in_the_call_until_the_next_load(ahead, monkeypatch, caplog):
    """A copy made ahead is memory beyond what the call needs: out of memory there, the call still runs (copying
    in the call, as before), said once, and no copy is tried ahead again until a load or unload drops the state."""
    import logging
    from comfyui_octet.kernels import registry
    a, b, c = layers = _layers(3)
    cpu = torch.device("cpu")
    tried = []

    def no_room(layer, device):
        tried.append(layer)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 66.00 MiB")

    monkeypatch.setattr(stream_ahead, "_launch", no_room)
    monkeypatch.setattr(stream_ahead, "_no_room", set())
    monkeypatch.setattr(registry, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="octet"):
        for step in range(3):
            for layer in layers:
                _same(stream_ahead.operands(layer, cpu), layer.operands(cpu))
    assert tried == [b] and not stream_ahead._pending               # tried once, at the second step's first call
    assert caplog.text.count("no free VRAM to copy a streamed layer") == 1
    stream_ahead.drop()
    stream_ahead.operands(a, cpu)
    assert tried == [b, b]


def test_a_call_out_of_order_drops_the_copies_ahead_but_does_not_retry_after_running_out_of_memory(ahead, monkeypatch):
    a, b, c = layers = _layers(3)
    cpu = torch.device("cpu")
    launch = stream_ahead._launch

    def room_for_one(layer, device):            # two ahead asked, the second finds no memory
        if stream_ahead._pending:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return launch(layer, device)

    monkeypatch.setattr(stream_ahead, "_launch", room_for_one)
    monkeypatch.setattr(stream_ahead, "_no_room", set())
    for layer in layers + [a]:
        stream_ahead.operands(layer, cpu)
    assert _pending() == [b] and ahead == [b]
    stream_ahead.operands(c, cpu)               # not the expected call: b's copy goes, the no-room state stays
    assert _pending() == [] and stream_ahead.stats["missed"] == 1
    for layer in layers:
        stream_ahead.operands(layer, cpu)
    assert ahead == [b]


def test_operands_copied_on_a_side_context_equal_the_plain_copy(rng):
    """``Int8Operands.of(copy_on=...)`` (a copy made ahead, allocated on the compute stream, copied on the copy
    stream): the same tensors as ``of``'s plain ``.to``, every copy issued inside the context, tensors already in
    place (device and dtype) used as they are."""
    from contextlib import contextmanager
    layer = _layers(1)[0]
    layer.set_smoothing(torch.rand(32, generator=rng) + 0.5)
    inside = []

    @contextmanager
    def copy_on():
        inside.append(True)
        yield
    cpu = torch.device("cpu")
    qweight = layer.weight.t().contiguous().t()               # a non-contiguous source: the copy is contiguous
    scale = layer.current_weight_scale().double()             # converted to fp32 in the copy
    ops = Int8Operands.of(qweight, scale, layer.bias, layer.pre_quant_scale, None, device=cpu, copy_on=copy_on)
    want = Int8Operands.of(qweight, scale, layer.bias, layer.pre_quant_scale, None, device=cpu)
    _same(ops, want)
    torch.testing.assert_close(ops.smooth, want.smooth, rtol=0, atol=0)
    assert ops.qweight.is_contiguous() and ops.scale.dtype == torch.float32
    assert len(inside) == 1                                   # only the fp64 scale needed a copy on the CPU
    assert ops.bias.data_ptr() == layer.bias.data_ptr()      # already in place: used as it is
