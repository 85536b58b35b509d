"""Import this repository as the package ``comfyui_octet``, the way ComfyUI imports a custom-node folder.

The demo and the bench scripts must not put the repository root on sys.path: its ``nodes/`` would
shadow ComfyUI's own ``nodes`` module and ``kernels/`` a pip package of that name. ``load()``
registers the package under a fixed name instead; ``load(comfy=True)`` also makes ComfyUI importable
(``nodes/host.py``). Scripts outside this folder add it to sys.path to import this module.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "comfyui_octet"


def load(comfy: bool = False, cpu: bool | None = None):
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
    if comfy:
        from comfyui_octet.nodes import host
        host.ensure_comfy(cpu=cpu)
    return sys.modules[NAME]
