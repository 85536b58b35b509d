"""Progress callbacks handed to octet/ (which never imports ComfyUI) for long node work.

Each call first checks the host's interrupt flag, so Cancel / POST /interrupt stops a quantize
loop, a sensitivity sweep or a calibration between two steps instead of after the whole job.
"""
from __future__ import annotations


def check_interrupt() -> None:
    import comfy.model_management as mm
    mm.throw_exception_if_processing_interrupted()


def interruptible(bar):
    """``progress(i, n)`` for octet's loops: raise the host's InterruptProcessingException when the
    user cancelled, else advance ``bar`` (a comfy.utils.ProgressBar)."""
    def progress(i: int, n: int) -> None:
        check_interrupt()
        bar.update_absolute(i, n)
    return progress
