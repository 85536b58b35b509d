"""Which host code Octet writes out or stands in for: source fingerprints of ComfyUI functions.

Octet's lean forwards (octet/lean_blocks.py) and Wan's q/k forward (octet/deferred.py) replace a host function's
work with their own, written from the host's source. Each such site checks, once per host module or class, that
the host's functions are the ones that code was written from (a sha256 of their source, ComfyUI 0.3.75's and
0.29.0's); where they differ (a newer ComfyUI), the host's own forward runs and the log says once why, so a host
change can cost speed but never correctness.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from typing import Callable

from .. import kernels


def module_of(obj):
    """The host module ``obj``'s class is defined in (its functions, e.g. ``optimized_attention``, are read from
    there at each call, as the host's own code reads them), or None."""
    return sys.modules.get(type(obj).__module__)


def digest(fn) -> str:
    """The first 16 hex digits of the sha256 of ``fn``'s source."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


_checked: dict[tuple, bool] = {}


def known(kind: str, owner, sources: Callable[[object], dict], table: dict) -> bool:
    """Whether ``owner``'s functions (``sources(owner)``: {name: digest}) all have a digest ``table`` lists for
    them; checked once per ``kind`` and owner (reading source is slow) and said once where not."""
    key = (kind, id(owner))
    ok = _checked.get(key)
    if ok is None:
        try:
            found = sources(owner)
        except (OSError, TypeError, AttributeError, ImportError) as e:   # no source on disk, a renamed function
            ok, reason = False, f"its source could not be read ({type(e).__name__}: {e})"
        else:
            unknown = sorted(k for k, v in found.items() if v not in table[k])
            ok, reason = not unknown, f"{', '.join(unknown)} differ from ComfyUI 0.3.75 / 0.29.0's"
        if not ok:
            kernels.registry.log_once(f"host-code-unknown:{kind}", f"Octet: the host's {kind} run their own code "
                                      f"(no lean or fused path): {reason}.", logging.INFO)
        _checked[key] = ok
    return ok
