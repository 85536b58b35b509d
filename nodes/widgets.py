"""Checks on widget values the host lets through.

ComfyUI validates a FLOAT widget against its min/max with ``<``/``>``, which NaN passes (every
comparison with NaN is false). A NaN cfg samples a black image, a NaN denoise fails deep inside
the sampler with "cannot convert float NaN to integer", a NaN cfg during Calibrate only fails
later in Quantize Model. Every Octet node with FLOAT widgets calls ``require_finite`` first.
"""
from __future__ import annotations

import math

from ..octet.api import OctetError


def require_finite(node: str, **values) -> None:
    """OctetError naming the node and widget when a float widget holds NaN/inf (or is not a number)."""
    for name, value in values.items():
        if value is None:  # an optional widget left unset
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OctetError(f"{node}: '{name}' is {value!r}, not a number. Set it to a number in the widget.")
        if not math.isfinite(value):
            raise OctetError(f"{node}: '{name}' is {value!r}; it must be a finite number. Set it in the widget "
                             f"(the host's range check lets NaN through).")
