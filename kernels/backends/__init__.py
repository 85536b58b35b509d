"""Accelerated backends. Each module registers an Implementation when imported; importing one
must never fail because its optional dependency (triton, bitsandbytes) is missing."""
