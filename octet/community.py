"""The community's ``int8_tensorwise`` files (comfy-kitchen's TensorWiseINT8Layout), decoded as the host does.

comfy-kitchen 0.2.24 (``comfy_kitchen/tensor/int8.py``, ``backends/eager/quantization.py``) writes
per layer ``L.weight`` int8 and ``L.weight_scale`` fp32, one of:

* per-tensor: a scalar scale; ``W = q * s``;
* per-row: ``[N, 1]`` scales; ``W = q * s[n]``;
* ConvRot (``comfy_quant`` has ``"convrot": true`` and ``"convrot_groupsize": g``, default 256, at
  the top level or under ``"params"``): the weight was rotated group-wise before a per-row
  quantization, ``q * s = W @ H^T`` per group of ``g`` input features, where ``H`` is the
  normalized regular Hadamard matrix of size ``g`` (a power of 4; Kronecker powers of
  ``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`` / sqrt(g), symmetric and orthogonal). The
  host dequantizes as ``(q * s) @ H^T`` per group and its INT8 GEMM rotates the activations
  instead: ``x @ H`` per group, then ``int8(x @ H) @ q^T``. Both equal ``x @ W^T``.

Octet keeps the int8 codes and per-row scales as they are (no second rounding) and, for ConvRot,
rotates the activations at run time (RotatedQuantLinear), exactly the host's GEMM math.
Whatever the host runs that Octet cannot (another format, an int8 conv or embedding, a group
size that does not divide the layer) is refused with an OctetError.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .api import OctetError
from .modules import QuantLinear

DEFAULT_GROUP_SIZE = 256  # comfy-kitchen's and ComfyUI 0.29's default when the spec names none

_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def convrot_group_size(spec: dict) -> Optional[int]:
    """The ConvRot group size of a layer spec, or None when it is not rotated (ComfyUI 0.29's rule:
    top-level keys first, then ``params``)."""
    params = spec.get("params") if isinstance(spec.get("params"), dict) else {}
    if not spec.get("convrot", params.get("convrot", False)):
        return None
    return int(spec.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_GROUP_SIZE)))


def hadamard(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """comfy-kitchen's normalized regular Hadamard matrix (``int8_utils._build_hadamard``)."""
    if size < 4 or (size & (size - 1)) != 0 or math.log(size, 4) % 1 != 0:
        raise OctetError(f"ConvRot group size {size} is not a power of 4 (4, 16, 64, 256, ...): the file is damaged "
                         f"or made by an incompatible tool.")
    key = (size, torch.device(device or "cpu"), dtype)
    if key not in _HADAMARD:
        h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
        h = h4
        while h.shape[0] < size:
            h = torch.kron(h, h4)
        _HADAMARD[key] = (h / size ** 0.5).to(device=key[1], dtype=dtype)
    return _HADAMARD[key]


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x @ H`` per group of the last dimension (H symmetric, so also ``x @ H^T``, its own inverse)."""
    shape = x.shape
    h = hadamard(group_size, x.device, x.dtype)
    return torch.matmul(x.reshape(-1, shape[-1] // group_size, group_size), h).reshape(shape)


def per_row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-tensor (scalar) or per-row ``[N, 1]`` weight scale as ``[N]`` fp32, the same numbers."""
    scale = scale.float().reshape(-1)
    return scale.expand(rows).clone() if scale.numel() == 1 else scale.clone()


def check_layer(name: str, spec: dict, weight: torch.Tensor, fname: str) -> None:
    """Refuse, with a message naming the layer, what the host runs but Octet cannot."""
    if spec.get("full_precision_matrix_mult"):
        raise OctetError(f"Layer '{name}' in '{fname}' asks for full-precision matmuls "
                         f"(full_precision_matrix_mult); Octet runs INT8 only. Load it with 'Load Diffusion Model'.")
    group = convrot_group_size(spec)
    if group is None:
        return
    if weight.dim() != 2:
        raise OctetError(f"Layer '{name}' in '{fname}' is a ConvRot INT8 tensor of shape {tuple(weight.shape)}; Octet "
                         f"runs ConvRot only on Linear layers. Load it with ComfyUI's 'Load Diffusion Model'.")
    try:
        hadamard(group)  # validates the size
    except OctetError as e:
        raise OctetError(f"Layer '{name}' in '{fname}': {e}") from None
    if weight.shape[1] % group:
        raise OctetError(f"Layer '{name}' in '{fname}': ConvRot group size {group} does not divide its "
                         f"{weight.shape[1]} input features; the file is damaged.")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, spec: dict) -> torch.Tensor:
    """The float weight the host computes with (comfy-kitchen's dequantize), fp32."""
    w = weight.float() * per_row_scale(scale, weight.shape[0]).reshape([-1] + [1] * (weight.dim() - 1))
    group = convrot_group_size(spec)
    return w if group is None else rotate(w, group)


class RotatedQuantLinear(QuantLinear):
    """A QuantLinear whose int8 codes are in ConvRot's rotated basis: activations are rotated per
    call (the host's INT8 GEMM math), and the float weight seen by LoRA/patches is un-rotated."""

    def __init__(self, qweight, weight_scale, bias, act, backend="auto", *, group_size: int):
        super().__init__(qweight, weight_scale, bias, act, backend)
        if qweight.shape[1] % group_size:
            raise ValueError(f"group size {group_size} does not divide {qweight.shape[1]} input features")
        hadamard(group_size)
        self.group_size = group_size

    def convert_weight(self, weight, inplace=False, **kwargs):
        return rotate(super().convert_weight(weight, inplace, **kwargs), self.group_size)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        return super().set_weight(rotate(weight.float(), self.group_size), inplace_update, seed, return_weight,
                                  **kwargs)

    def forward(self, x):
        if self.weight_function or self.bias_function:
            return super().forward(x)  # float path: convert_weight already un-rotates the weight
        return super().forward(rotate(x, self.group_size))

    def extra_repr(self) -> str:
        return f"convrot_groupsize={self.group_size}, " + super().extra_repr()
