"""bitsandbytes backend: LLM.int8()-style matmul (``Linear8bitLt``) with an outlier threshold.

Octet's INT8 weight ([N, K] int8 with per-output-channel scales) is exactly bitsandbytes' row-wise
format: ``CB`` = qweight and ``SCB`` = row absmax = w_scale * 127, so no re-quantization happens.
Activations are quantized per token by bitsandbytes itself; input columns holding any value with
|x| >= ``OUTLIER_THRESHOLD`` are held back and multiplied in float against the dequantized weight
columns (the mixed-precision decomposition of LLM.int8()). Set the threshold to 0 for plain W8A8.

Selectable by name only (``backend="bitsandbytes"``; priority below the torch reference, so AUTO
never picks it): it is for users who prefer it or GPUs where Triton is unavailable. It has no conv
kernel and no static activation scales; bitsandbytes' CUDA kernels quantize fp16 activations, so
bf16 inputs are cast to fp16 for the int8 part (as ``Linear8bitLt`` does).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry, torch_ref

NAME = registry.Backend.BNB.value
# bitsandbytes' Linear8bitLt default; 0 disables the outlier decomposition.
OUTLIER_THRESHOLD = 6.0

try:
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes.*)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
    _IMPORT_ERROR = f"bitsandbytes not importable ({type(exc).__name__}: {exc})"


def _unavailable_reason() -> Optional[str]:
    return _IMPORT_ERROR


def _rejects(req: registry.Request) -> Optional[str]:
    if req.act == "static":
        return "bitsandbytes quantizes activations per token; static scales are not supported"
    if req.act == "none":
        return "bitsandbytes has no weight-only INT8 matmul"
    if req.device not in ("cuda", "cpu"):
        return f"device type {req.device!r}"
    return None


def linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
           act: str, smooth: Optional[torch.Tensor], static_scale: Optional[torch.Tensor],
           threshold: float = OUTLIER_THRESHOLD) -> torch.Tensor:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    if act != "dynamic":
        raise ValueError(f"bitsandbytes backend supports act='dynamic' only, got {act!r}")
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    if smooth is not None:
        a = torch_ref.smoothed(a, smooth, channel_dim=1)
    a = a.to(torch.float16 if a.is_cuda else x.dtype).contiguous()
    row_absmax = (w_scale.reshape(-1).float() * torch_ref.QMAX).contiguous()
    ops = torch.ops.bitsandbytes
    ca, sca, outlier_cols = ops.int8_vectorwise_quant(a, threshold)
    b = None if bias is None else bias.to(a.dtype)
    if threshold > 0.0:
        out, _ = ops.int8_mixed_scaled_mm(a, ca, qweight.contiguous(), sca, row_absmax, outlier_cols, b)
    else:
        out = ops.int8_scaled_mm(ca, qweight.contiguous(), sca, row_absmax, bias=b, dtype=a.dtype)
    return out.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


def prepare(req: registry.Request, w):
    return lambda x, static: linear(x, w.qweight, w.scale, w.bias, req.act, w.smooth, static)


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME,
    unavailable_reason=_unavailable_reason,
    rejects=_rejects,
    prepare=prepare,
    priority=-10,
    ops=("linear",),
))
