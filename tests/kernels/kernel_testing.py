"""Helpers for the kernel tests: where the Triton kernels run, inputs, and how close is close.

On a machine with CUDA the kernels run on the GPU; elsewhere the tests need TRITON_INTERPRET=1
(Triton then runs the same kernels on CPU tensors) and skip the Triton tests without it.
"""
import pytest
import torch

from comfyui_octet.kernels.backends import triton_support


def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() and not triton_support.interpreting() else "cpu"


requires_triton = pytest.mark.skipif(
    triton_support.unavailable_reason() is not None,
    reason=f"Triton kernels cannot run here: {triton_support.unavailable_reason()}")

# Tolerances for outputs after the fp32 epilogue has been rounded to the output dtype: a couple of
# units in the last place of that dtype, relative to the output's magnitude.
EPILOGUE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def randn(shape, rng, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh normal samples (never zeros), made on CPU from the test's OS-seeded generator."""
    return (torch.randn(shape, generator=rng) * scale).to(device=device, dtype=dtype)


def positive(shape, rng, device="cpu", low=0.5, high=2.0):
    return (torch.rand(shape, generator=rng) * (high - low) + low).to(device)


def assert_epilogue_close(actual: torch.Tensor, expected: torch.Tensor):
    """Same integers, same scales: differences come only from rounding the fp32 result."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    rtol = EPILOGUE_RTOL[expected.dtype]
    scale = expected.float().abs().amax().clamp_min(1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * float(scale))


def sqnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.double()
    err = actual.double() - ref
    return float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum().clamp_min(1e-30)))


