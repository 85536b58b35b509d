"""The exact reference (``kernels/torch_ref.py``) as a backend: ``backend="torch"``.

It is the oracle every other backend is tested against, so it is never tuned for speed; on CPU,
AUTO picks the fast ``cpu`` backend instead (backends/cpu.py) and this one runs only when asked.
"""
from __future__ import annotations

from .. import registry, torch_ref

NAME = registry.Backend.TORCH.value


def prepare(req: registry.Request, w):
    q, s, b, sm = w.qweight, w.scale, w.bias, w.smooth
    if req.op == "linear":
        if req.act == "none":
            return lambda x, static: torch_ref.linear_w8a16(x, q, s, b)
        return lambda x, static: torch_ref.linear_w8a8(x, q, s, b, sm, static)
    args = w.conv.args()
    if req.act == "none":
        return lambda x, static: torch_ref.conv2d_w8a16(x, q, s, b, *args)
    return lambda x, static: torch_ref.conv2d_w8a8(x, q, s, b, *args, sm, static)


def prepare_mlp(req: registry.Request, w1, w2):
    def run(x, s1, s2):
        return torch_ref.static_mlp(x, (w1.qweight, w1.scale, w1.bias, w1.smooth, s1),
                                    (w2.qweight, w2.scale, w2.bias, w2.smooth, s2))
    return run


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME, unavailable_reason=lambda: None, rejects=lambda req: None, prepare=prepare, priority=0,
    prepare_mlp=prepare_mlp))
