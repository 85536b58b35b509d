"""Accelerated backends. Each module registers an Implementation when imported; importing one
must never fail because its optional dependency (triton, bitsandbytes) is missing: the record's
``unavailable_reason`` says why it cannot run instead."""
from . import bnb, float_fallback, triton_backend  # noqa: F401
