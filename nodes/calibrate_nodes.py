"""Calibrate, Save Calibration, Load Calibration, Calibration Prompts.

Calibrate runs the host's own sampler (``nodes/sampling.calibrate``, the stock KSampler path) on a
*clone* of the float MODEL that carries an APPLY_MODEL wrapper: before each diffusion-model call
the wrapper puts the call's sigma into the timestep-group selector, and forward pre-hooks on
every Linear/Conv2d file the layer's input under that group. Hooks and wrapper are gone when the
node returns (also after an error); the source MODEL is untouched.

Calibrate has only what shapes the recording (model, conditioning, the sampling that visits the
noise levels, how many timestep groups, the sample cap). Everything that only chooses how the
statistics become scales (observer, percentile, one scale or one per group, SmoothQuant alpha) is a
widget of Quantize Model: the hooks record the same statistics whatever those settings are (exact
absmax and per-channel absmax, histograms of |x| and of the within-channel shape, per group), so a
CALIBRATION serves every such setting without sampling again.

Where files live: saved calibrations go to ``ComfyUI/models/octet_calibration/`` (user data
belongs in the models folder, which survives updates of the node pack); Load Calibration lists
that folder and the pack's ``calibration_data/``, which ships the prompt sets and may ship
calibrations made for public models.
"""
from __future__ import annotations

import os

import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..octet import safefile
from ..octet.api import OctetError
from ..octet.calibration import Calibration, coverage_notes
from . import sampling_defaults as sd
from .host import PACK_ROOT
from .sampling import calibrate
from .types import CALIBRATION
from .widgets import require_finite

FOLDER = "octet_calibration"
PACK_DATA = os.path.join(PACK_ROOT, "calibration_data")


def register_folder() -> None:
    """models/octet_calibration (where Save writes) and the pack's calibration_data (shipped files)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.models_dir, FOLDER), PACK_DATA], {".safetensors"})


register_folder()
safefile.sweep_tree(folder_paths.get_folder_paths(FOLDER)[0])  # partial saves of a killed earlier run


def _files(ext: str) -> list[str]:
    return sorted(f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(ext))


def _prompt_sets() -> list[str]:
    return sorted(f for f in os.listdir(PACK_DATA) if f.endswith(".txt")) if os.path.isdir(PACK_DATA) else []


class Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetCalibrate",
            display_name="Calibrate (INT8 static)",
            category="octet",
            description="Sample once with the float MODEL and record every Linear/Conv2d input per timestep "
                        "group: the activation ranges static W8A8 needs. The MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The float diffusion model you will quantize."),
                io.Conditioning.Input("positive", tooltip="Prompts to calibrate on; a batch of several prompts "
                                                          "(e.g. from Calibration Prompts) covers more ground."),
                io.Conditioning.Input("negative", tooltip="Negative prompt, as you will sample."),
                io.Latent.Input("latent_image", tooltip="Size of the calibration images; repeated to the "
                                                        "prompt batch if smaller."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the calibration sampling."),
                io.Int.Input("steps", default=sd.STEPS, min=1, max=1000,
                             tooltip="Use the steps/scheduler you will sample with: groups are cut on its sigmas."
                                     + sd.MATCH_TIP),
                io.Float.Input("cfg", default=sd.CFG, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG as you will sample with (it changes the activations seen)." + sd.MATCH_TIP),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=sd.SAMPLER,
                               tooltip="Sampler as you will sample with." + sd.MATCH_TIP),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=sd.SCHEDULER,
                               tooltip="Scheduler as you will sample with: it sets the sigmas the groups are cut on."
                                       + sd.MATCH_TIP),
                io.Int.Input("timestep_groups", default=4, min=1, max=16,
                             tooltip="Noise-level bands with their own statistics (log-sigma, equal step counts). "
                                     "Quantize Model chooses whether to use one scale per band or one for all."),
            ],
            outputs=[CALIBRATION.Output(display_name="CALIBRATION"),
                     io.String.Output(display_name="report", tooltip="Layers, groups and the time it took.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                timestep_groups):
        # Workflows saved when observer/percentile/... were widgets here still run: the host passes only
        # declared inputs (those settings are now Quantize Model's, with the same defaults).
        require_finite("Calibrate", cfg=cfg)
        calibration, seconds = calibrate(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                         scheduler, timestep_groups)
        return io.NodeOutput(calibration, describe(calibration, seconds))


def describe(cal: Calibration, seconds: float | None = None) -> str:
    lines = [f"{len(cal.layers)} layers, {cal.groups} timestep group(s), sigma boundaries "
             f"{[round(b, 4) for b in cal.selector.boundaries]}",
             f"model {cal.architecture} fingerprint {cal.fingerprint}"]
    if seconds is not None:
        lines.append(f"calibration sampling took {seconds:.2f} s")
    lines += [f"WARNING: {n}" for n in coverage_notes(cal.info.get("conditioning", {}).get("positive", {}))]
    calls = [int(s.calls.sum()) for s in cal.layers.values()]
    if calls:
        lines.append(f"forward calls per layer: {min(calls)}..{max(calls)}")
    return "\n".join(lines)


class SaveCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetSaveCalibration",
            display_name="Save Calibration",
            category="octet",
            description="Save a CALIBRATION to models/octet_calibration as safetensors (+ JSON header).",
            is_output_node=True,
            inputs=[CALIBRATION.Input("calibration", tooltip="From Calibrate."),
                    io.String.Input("filename", default="octet/calibration",
                                    tooltip="Path under models/octet_calibration, without extension."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace an existing file of that name.")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, calibration, filename, overwrite):
        root = folder_paths.get_folder_paths(FOLDER)[0]
        path = safefile.output_path(root, filename, what="calibration")
        if os.path.exists(path) and not overwrite:
            raise OctetError(f"'{path}' already exists. Choose another filename or enable overwrite.")
        return io.NodeOutput(calibration.save(path))


class LoadCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetLoadCalibration",
            display_name="Load Calibration",
            category="octet",
            description="Load a saved CALIBRATION (activation statistics). How they become static scales is set "
                        "on Quantize Model (change it freely: no re-sampling needed).",
            inputs=[io.Combo.Input("calibration_name", options=_files(".safetensors"),
                                   tooltip="A file in models/octet_calibration or the pack's calibration_data.")],
            outputs=[CALIBRATION.Output(display_name="CALIBRATION"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, calibration_name):
        path = folder_paths.get_full_path(FOLDER, calibration_name)
        if path is None:
            raise OctetError(f"'{calibration_name}' is not in models/{FOLDER} or calibration_data. Refresh the "
                             f"node list or copy the file there.")
        cal = Calibration.load(path)
        return io.NodeOutput(cal, describe(cal))


class CalibrationPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetCalibrationPrompts",
            display_name="Calibration Prompts",
            category="octet",
            description="Encode a shipped prompt set (calibration_data/*.txt, one prompt a line) as one "
                        "CONDITIONING batch for Calibrate.",
            inputs=[io.Clip.Input("clip", tooltip="The text encoder of the model you will calibrate."),
                    io.Combo.Input("prompt_set", options=_prompt_sets(),
                                   tooltip="A prompt file in the pack's calibration_data/ (one prompt a line)."),
                    io.Int.Input("count", default=8, min=1, max=256, tooltip="How many prompts to use, from the top.")],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, clip, prompt_set, count):
        import torch
        prompts = read_prompt_set(prompt_set)[:count]
        conds, pooled = [], []
        for p in prompts:
            tokens = clip.tokenize(p)
            c, pool = clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(c)
            pooled.append(pool)
        extra = {"pooled_output": torch.cat(pooled)} if all(p is not None for p in pooled) else {}
        try:
            batch = torch.cat(conds)
        except RuntimeError as e:
            raise OctetError(f"Prompts of '{prompt_set}' encode to different lengths ({e}); shorten the long ones "
                             f"or use fewer prompts.") from e
        return io.NodeOutput([[batch, extra]])


def read_prompt_set(name: str) -> list[str]:
    path = os.path.join(PACK_DATA, os.path.basename(name))
    if not os.path.isfile(path):
        raise OctetError(f"No prompt set '{name}' in {PACK_DATA}; pick one from the list.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise OctetError(f"Prompt set '{name}' has no prompts (one per line; '#' starts a comment).")
    return prompts

