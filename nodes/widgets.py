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


CFG_GUARD_KEY = "octet_finite_cfg"


def install_cfg_guard(patcher) -> None:
    """Refuse a NaN/inf cfg on any sampler (the stock KSampler included) that samples this MODEL.

    The host's KSampler checks its cfg widget with min/max only, and a NaN cfg turns every step into
    NaN: a black image and no error. An OUTER_SAMPLE wrapper sees the guider (``executor.class_obj``)
    before the first step; it is stored on the patcher and copied into its clones.
    """
    import comfy.patcher_extension

    def finite_cfg(executor, *args, **kwargs):
        cfg = getattr(executor.class_obj, "cfg", None)
        if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
            require_finite("Sampling an Octet INT8 MODEL", cfg=cfg)
        return executor(*args, **kwargs)

    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patcher.remove_wrappers_with_key(kind, CFG_GUARD_KEY)
    patcher.add_wrapper_with_key(kind, CFG_GUARD_KEY, finite_cfg)
