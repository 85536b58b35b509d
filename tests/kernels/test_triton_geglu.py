"""GEGLU's gate (x * gelu(gate) from the halves of the projection) in one pass, against torch_ref.geglu (the host's
chunk, F.gelu and multiply): fp32 to a few fp32 steps of x * gate (the exact GELU's 1 + erf cancels in the negative
tail, where erf implementations differ in the last bits); bf16 (GPU only) to two rounding steps of the output (the
rounded GELU and the product can each land one step apart)."""
import pytest
import torch

from comfyui_octet.kernels import torch_ref
from kernel_testing import randn, requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 2 * 40), (3, 2 * 1000), (1, 5, 3, 2 * 24)])
@pytest.mark.parametrize("config", [None, (64, 2)])
def test_geglu_matches_host_ops(dtype, shape, config, rng, device):
    from comfyui_octet.kernels.backends import triton_geglu
    if dtype == torch.bfloat16 and not str(device).startswith("cuda"):
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): bf16 runs on a GPU")
    h = randn(shape, rng, dtype, device, scale=2.0)
    assert triton_geglu.takes(h)
    ref = torch_ref.geglu(h)
    for _ in range(2):                        # the second call goes through the recorded direct launch on a GPU
        out = triton_geglu.geglu(h, config)
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        eps = torch.finfo(dtype).eps
        diff = (out.float() - ref.float()).abs()
        if dtype == torch.float32:
            x, gate = h.chunk(2, dim=-1)
            assert (diff <= 16 * eps * (ref.abs() + x.abs() * gate.abs().clamp_min(1.0))).all()
        else:
            assert (diff / (eps * ref.float().abs().clamp_min(1.0))).max() <= 2.0


def test_takes_refuses_what_it_cannot_read(rng, device):
    from comfyui_octet.kernels.backends import triton_geglu
    h = randn((4, 6, 16), rng, device=device)
    assert triton_geglu.takes(h)
    assert not triton_geglu.takes(h.transpose(0, 1))     # not contiguous
    assert not triton_geglu.takes(h[..., :15])            # odd width (and a view)
    assert not triton_geglu.takes(h.to(torch.int32))
    assert not triton_geglu.takes(h[:0])
