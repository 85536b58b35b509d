import pytest

from kernel_testing import kernel_device


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run in this session: the GPU if there is one, else the interpreter."""
    return kernel_device()
