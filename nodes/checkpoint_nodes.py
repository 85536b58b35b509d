"""Save Quantized / Load Quantized: INT8 checkpoints as shareable safetensors."""
from __future__ import annotations

import json
import logging
import os

import folder_paths
from comfy_api.latest import io

from ..octet import checkpoint, fileformat, safefile
from ..octet.api import OctetError
from ..octet.config import BACKENDS
from . import bridge, graph_step, model_files

log = logging.getLogger("octet")

FOLDER = "diffusion_models"


def _sweep_partial_saves() -> None:
    """Partial files that a killed earlier run left (octet/safefile.py names them with its pid)."""
    for root in folder_paths.get_folder_paths(FOLDER):
        safefile.sweep_tree(root)


_sweep_partial_saves()


def _checkpoints() -> list[str]:
    return sorted(f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors"))


class SaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetSaveQuantized",
            display_name="Save Quantized (INT8)",
            category="octet",
            description="Save an Octet INT8 MODEL as a safetensors file in models/diffusion_models.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from Quantize Model or Load Quantized."),
                io.String.Input("filename", default="octet/model_int8",
                                tooltip="Path under models/diffusion_models, without extension."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name (written atomically)."),
                io.Combo.Input("kind", options=list(fileformat.KINDS), default=fileformat.KIND_OCTET, optional=True,
                               tooltip="octet: every layer as quantized (INT8 convs, static, SmoothQuant); only "
                                       "Octet's Load Quantized runs it, stock loaders refuse it. portable: what "
                                       "stock ComfyUI 0.29+ 'Load Diffusion Model' runs: unsmoothed Linear layers "
                                       "in int8_tensorwise, every other layer back in the source float dtype."),
            ],
            outputs=[io.String.Output(display_name="path"),
                     io.String.Output(display_name="file_kind", tooltip="Which kind of file was written.")],
        )

    @classmethod
    def execute(cls, model, filename, overwrite, kind=fileformat.KIND_OCTET):
        # The host lists the legacy models/unet first for this folder type; write where the tooltip says.
        roots = folder_paths.get_folder_paths(FOLDER)
        root = next((r for r in roots if os.path.basename(os.path.normpath(r)) == FOLDER), roots[0])
        path = safefile.output_path(root, filename, what="model")
        if os.path.exists(path) and not overwrite:
            raise OctetError(f"'{path}' already exists. Choose another filename or enable overwrite.")
        meta = model_files.save_model(model, path, kind=kind)
        specs = {n: checkpoint.layer_spec(m) for n, m in bridge.quantized_layers(model).items()}
        if kind == fileformat.KIND_PORTABLE:  # the others were written as float
            specs = {n: s for n, s in specs.items() if fileformat.host_runs(s)}
        return io.NodeOutput(path, fileformat.describe(json.loads(meta["octet"]), specs))


class LoadQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetLoadQuantized",
            display_name="Load Quantized (INT8)",
            category="octet",
            description="Load an INT8 checkpoint saved by Octet (or an int8_tensorwise comfy_quant file). "
                        "Needs no float weights.",
            inputs=[
                io.Combo.Input("ckpt_name", options=_checkpoints(), tooltip="A file in models/diffusion_models."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="INT8 kernels: auto picks the fastest available per layer."),
                io.Combo.Input("cuda_graph", options=list(graph_step.CHOICES), default="auto", optional=True,
                               tooltip=graph_step.CHOICE_TIP),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="file_kind",
                                      tooltip="Which kind of file this is: Octet, Octet portable or a community "
                                              "int8_tensorwise file, and which loaders run it.")],
        )

    @classmethod
    def execute(cls, ckpt_name, backend, cuda_graph=None):
        path = folder_paths.get_full_path(FOLDER, ckpt_name)
        if path is None:
            raise OctetError(f"'{ckpt_name}' is not in models/{FOLDER}. Refresh the node list or copy the file there.")
        patcher = model_files.load_model(path, backend=backend)
        goal = (patcher.model_options[bridge.OPTIONS_KEY].get("config") or {}).get("goal", "speed")
        log.info("Octet: %s: %s", ckpt_name, graph_step.install_default(patcher, cuda_graph or "auto", goal))
        return io.NodeOutput(patcher, patcher.model_options[bridge.OPTIONS_KEY]["file_kind"])
