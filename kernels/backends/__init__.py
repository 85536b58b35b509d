"""Backends. Each module registers an Implementation when imported; importing one must never fail
because its optional dependency (triton, bitsandbytes) is missing: the record's
``unavailable_reason`` says why it cannot run instead. The reference registers first, so it is
there for every fallback; none of these modules imports the custom-op layer (kernels/ops.py)."""
from . import reference, cpu, float_fallback, triton_backend, bnb  # noqa: F401
