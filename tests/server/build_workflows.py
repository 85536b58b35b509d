"""Build the example workflows in the real ComfyUI frontend and export them.

    .venv/bin/python tests/server/build_workflows.py [--screenshots]

Starts the real server with Octet installed, opens the served frontend in headless Chromium, creates
each workflow's nodes with the frontend's own LiteGraph (so the UI format, widget order, link ids and
sizes are exactly what the frontend writes), then saves:
  example_workflows/<name>.json         UI format (ComfyUI lists this folder as the pack's templates)
  tests/server/api_workflows/<name>.json API format, from the frontend's own graphToPrompt()
With --screenshots, also docs/workflow_<name>.png of each workflow loaded back from its file and run.

The workflows use the embedded reference model, few steps and small latents, so they run on a CPU in
seconds and need no downloads. Edit SPECS below and rerun to change them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this folder only (octet_harness)
from octet_harness import API_WORKFLOWS, ROOT, WORKFLOWS, Browser, ComfyServer, load_json  # noqa: E402

SAMPLING = {"seed": 0, "control_after_generate": "fixed", "steps": 10, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "normal"}
CKPT = "octet/example_int8"
UPSCALE = {"upscale_method": "nearest-exact", "scale_by": 4.0}  # the reference models make 32x32 images

# Each node: key, type, column, widget values by name (others keep the node's defaults), optional title.
# Links: (from key, output name, to key, input name). Columns are laid out left to right, nodes stacked.
SPECS = {
    "octet_calibrate_quantize_sample_save": {
        "note": "Octet example (a): calibrate -> policy -> quantize (static W8A8) -> sample -> save.\n\n"
                "Runs anywhere: the Octet Reference Model is a small SD1.5-class UNet trained on Fashion-MNIST, "
                "shipped with the pack.\n\n"
                "1. Calibrate samples once with the float model and records activation ranges per timestep group.\n"
                "2. Mixed-Precision Policy (preset auto) keeps sensitive layers in float.\n"
                "3. Quantize Model makes the INT8 model; Save Quantized writes models/diffusion_models/"
                f"{CKPT}.safetensors (load it with example (b)).\n"
                "4. INT8 Sampler runs the first step with the float model, the rest in INT8.\n\n"
                "For your own model: swap the reference nodes for a checkpoint loader, CLIP Text Encode and an "
                "Empty Latent, and use your usual steps.",
        "nodes": [
            ("model", "OctetReferenceModel", 0, {"model": "unet", "variant": "plain"}, None),
            ("pos", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "sneaker"}, "positive"),
            ("neg", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "unconditional"}, "negative"),
            ("latent", "OctetReferenceLatent", 0, {"model": "unet", "batch": 4}, None),
            ("calib", "OctetCalibrate", 1, dict(SAMPLING, timestep_groups=2), None),
            ("policy", "OctetMixedPrecisionPolicy", 1, {"preset": "auto"}, None),
            ("quant", "OctetQuantizeModel", 2, {"mode": "static"}, None),
            ("save", "OctetSaveQuantized", 2, {"filename": CKPT, "overwrite": True}, None),
            ("report", "PreviewAny", 2, {}, "quantize report"),
            ("sampler", "OctetInt8Sampler", 3, dict(SAMPLING, float_first_steps=1, float_last_steps=0), None),
            ("timing", "PreviewAny", 3, {}, "sampler timing"),
            ("decode", "OctetReferenceDecode", 4, {}, None),
            ("big", "ImageScaleBy", 4, UPSCALE, "x4 for viewing"),
            ("image", "SaveImage", 4, {"filename_prefix": "octet/example_a"}, None),
        ],
        "links": [
            ("model", "MODEL", "calib", "model"), ("pos", "CONDITIONING", "calib", "positive"),
            ("neg", "CONDITIONING", "calib", "negative"), ("latent", "LATENT", "calib", "latent_image"),
            ("model", "MODEL", "policy", "model"),
            ("model", "MODEL", "quant", "model"), ("policy", "POLICY", "quant", "policy"),
            ("calib", "CALIBRATION", "quant", "calibration"),
            ("quant", "MODEL", "save", "model"), ("quant", "report", "report", "source"),
            ("quant", "MODEL", "sampler", "model"), ("model", "MODEL", "sampler", "float_model"),
            ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "timing", "timing", "source"),
            ("model", "MODEL", "decode", "model"), ("sampler", "LATENT", "decode", "samples"),
            ("decode", "IMAGE", "big", "image"), ("big", "IMAGE", "image", "images"),
        ],
    },
    "octet_load_quantized_sample": {
        "note": "Octet example (b): load an INT8 checkpoint and sample it.\n\n"
                f"Run example (a) first: it saves {CKPT}.safetensors in models/diffusion_models. "
                "Load Quantized rebuilds the INT8 model without allocating float weights for its quantized layers; "
                "INT8 Sampler with float_first_steps 0 samples in INT8 only.\n\n"
                "Octet Reference Model feeds only the Decode node here (the reference models have no VAE: Decode "
                "needs their pixel layout).",
        "nodes": [
            ("load", "OctetLoadQuantized", 0, {"ckpt_name": CKPT + ".safetensors", "backend": "auto"}, None),
            ("pos", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "bag"}, "positive"),
            ("neg", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "unconditional"}, "negative"),
            ("latent", "OctetReferenceLatent", 0, {"model": "unet", "batch": 4}, None),
            ("sampler", "OctetInt8Sampler", 1, dict(SAMPLING, float_first_steps=0, float_last_steps=0), None),
            ("timing", "PreviewAny", 1, {}, "sampler timing"),
            ("model", "OctetReferenceModel", 2, {"model": "unet", "variant": "plain"}, "reference (for Decode)"),
            ("decode", "OctetReferenceDecode", 2, {}, None),
            ("big", "ImageScaleBy", 2, UPSCALE, "x4 for viewing"),
            ("image", "SaveImage", 3, {"filename_prefix": "octet/example_b"}, None),
        ],
        "links": [
            ("load", "MODEL", "sampler", "model"), ("pos", "CONDITIONING", "sampler", "positive"),
            ("neg", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "timing", "timing", "source"),
            ("model", "MODEL", "decode", "model"), ("sampler", "LATENT", "decode", "samples"),
            ("decode", "IMAGE", "big", "image"), ("big", "IMAGE", "image", "images"),
        ],
    },
    "octet_evaluate_fp_vs_int8": {
        "note": "Octet example (c): evaluate INT8 against the float model.\n\n"
                "Evaluate samples both models with the same seeds through KSampler and reports PSNR/SSIM per image "
                "(FID from 16 images up), ms/step, peak memory and size; it draws a FP | INT8 | |diff| grid and a "
                "quality / speed / size chart.",
        "nodes": [
            ("model", "OctetReferenceModel", 0, {"model": "unet", "variant": "plain"}, None),
            ("pos", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "ankle-boot"}, "positive"),
            ("neg", "OctetReferenceConditioning", 0, {"model": "unet", "class_name": "unconditional"}, "negative"),
            ("latent", "OctetReferenceLatent", 0, {"model": "unet", "batch": 4}, None),
            ("quant", "OctetQuantizeModel", 1, {"mode": "dynamic"}, None),
            ("eval", "OctetEvaluate", 1, dict(SAMPLING), None),
            ("report", "PreviewAny", 2, {}, "evaluation report"),
            ("grid", "SaveImage", 2, {"filename_prefix": "octet/example_c_grid"}, "FP | INT8 | diff"),
            ("chart", "SaveImage", 3, {"filename_prefix": "octet/example_c_chart"}, "quality / speed / size"),
        ],
        "links": [
            ("model", "MODEL", "quant", "model"),
            ("model", "MODEL", "eval", "fp_model"), ("quant", "MODEL", "eval", "quant_model"),
            ("pos", "CONDITIONING", "eval", "positive"), ("neg", "CONDITIONING", "eval", "negative"),
            ("latent", "LATENT", "eval", "latent_image"),
            ("eval", "report", "report", "source"), ("eval", "grid", "grid", "images"),
            ("eval", "chart", "chart", "images"),
        ],
    },
}

# Workflows on the user's real models, with ComfyUI's stock loaders. They cannot run here (no model files):
# the tests validate them against /object_info of both hosts (test_server.py). Their files, which the
# user puts in ComfyUI's models/ folders (README, "Example workflows"):
REAL_MODEL_FILES = {
    "checkpoints": ["sd_xl_base_1.0.safetensors"],
    "diffusion_models": ["flux1-dev.safetensors", "octet/flux1-dev_int8.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
    "vae": ["ae.safetensors"],
}
REAL_SAMPLING = {"seed": 0, "control_after_generate": "fixed", "sampler_name": "euler"}
PROMPT = "a red fox in fresh snow at sunrise, detailed fur, photograph"
SPECS.update({
    "octet_sdxl_quantize_sample_save": {
        "real_models": True,
        "note": "Octet on SDXL: quantize the UNet to INT8, sample, save.\n\n"
                "Needs models/checkpoints/sd_xl_base_1.0.safetensors (Stability AI's SDXL base 1.0).\n\n"
                "Quantize Model (dynamic W8A8) makes the INT8 UNet; INT8 Sampler runs the first step with the "
                "float UNet, the rest in INT8; Save Quantized writes models/diffusion_models/octet/"
                "sdxl_base_int8.safetensors. CLIP and VAE stay the checkpoint's own.",
        "nodes": [
            ("ckpt", "CheckpointLoaderSimple", 0, {"ckpt_name": "sd_xl_base_1.0.safetensors"}, None),
            ("pos", "CLIPTextEncode", 1, {"text": PROMPT}, "positive"),
            ("neg", "CLIPTextEncode", 1, {"text": "blurry, low quality, watermark"}, "negative"),
            ("latent", "EmptyLatentImage", 1, {"width": 1024, "height": 1024, "batch_size": 1}, None),
            ("quant", "OctetQuantizeModel", 2, {"mode": "dynamic"}, None),
            ("save", "OctetSaveQuantized", 2, {"filename": "octet/sdxl_base_int8", "overwrite": False}, None),
            ("report", "PreviewAny", 2, {}, "quantize report"),
            ("sampler", "OctetInt8Sampler", 3, dict(REAL_SAMPLING, steps=30, cfg=6.0, scheduler="karras",
                                                   float_first_steps=1, float_last_steps=0), None),
            ("timing", "PreviewAny", 3, {}, "sampler timing"),
            ("decode", "VAEDecode", 4, {}, None),
            ("image", "SaveImage", 4, {"filename_prefix": "octet/sdxl_int8"}, None),
        ],
        "links": [
            ("ckpt", "MODEL", "quant", "model"), ("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
            ("quant", "MODEL", "save", "model"), ("quant", "report", "report", "source"),
            ("quant", "MODEL", "sampler", "model"), ("ckpt", "MODEL", "sampler", "float_model"),
            ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "timing", "timing", "source"),
            ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "image", "images"),
        ],
    },
    "octet_flux_quantize_sample_save": {
        "real_models": True,
        "note": "Octet on Flux.1-dev: quantize the DiT to INT8, sample, save.\n\n"
                "Needs models/diffusion_models/flux1-dev.safetensors, models/text_encoders/clip_l.safetensors and "
                "t5xxl_fp16.safetensors, models/vae/ae.safetensors (the files of ComfyUI's Flux examples).\n\n"
                "Quantize Model (dynamic W8A8) halves the DiT's weight memory; INT8 Sampler (cfg 1, Flux Guidance "
                "3.5) runs the first step in float; Save Quantized writes models/diffusion_models/octet/"
                "flux1-dev_int8.safetensors for the Load Quantized workflow.",
        "nodes": [
            ("unet", "UNETLoader", 0, {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, None),
            ("clip", "DualCLIPLoader", 0, {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                           "type": "flux"}, None),
            ("vae", "VAELoader", 0, {"vae_name": "ae.safetensors"}, None),
            ("pos", "CLIPTextEncode", 1, {"text": PROMPT}, "positive"),
            ("guid", "FluxGuidance", 1, {"guidance": 3.5}, None),
            ("neg", "ConditioningZeroOut", 1, {}, "negative (unused at cfg 1)"),
            ("latent", "EmptySD3LatentImage", 1, {"width": 1024, "height": 1024, "batch_size": 1}, None),
            ("quant", "OctetQuantizeModel", 2, {"mode": "dynamic"}, None),
            ("save", "OctetSaveQuantized", 2, {"filename": "octet/flux1-dev_int8", "overwrite": False}, None),
            ("report", "PreviewAny", 2, {}, "quantize report"),
            ("sampler", "OctetInt8Sampler", 3, dict(REAL_SAMPLING, steps=20, cfg=1.0, scheduler="simple",
                                                   float_first_steps=1, float_last_steps=0), None),
            ("timing", "PreviewAny", 3, {}, "sampler timing"),
            ("decode", "VAEDecode", 4, {}, None),
            ("image", "SaveImage", 4, {"filename_prefix": "octet/flux_int8"}, None),
        ],
        "links": [
            ("unet", "MODEL", "quant", "model"), ("clip", "CLIP", "pos", "clip"),
            ("pos", "CONDITIONING", "guid", "conditioning"), ("pos", "CONDITIONING", "neg", "conditioning"),
            ("quant", "MODEL", "save", "model"), ("quant", "report", "report", "source"),
            ("quant", "MODEL", "sampler", "model"), ("unet", "MODEL", "sampler", "float_model"),
            ("guid", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "timing", "timing", "source"),
            ("sampler", "LATENT", "decode", "samples"), ("vae", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "image", "images"),
        ],
    },
    "octet_flux_load_quantized_sample": {
        "real_models": True,
        "note": "Octet on Flux.1-dev: load the INT8 file and sample it; no float DiT is loaded.\n\n"
                "Needs models/diffusion_models/octet/flux1-dev_int8.safetensors (written by the Flux quantize "
                "workflow), models/text_encoders/clip_l.safetensors and t5xxl_fp16.safetensors, "
                "models/vae/ae.safetensors.",
        "nodes": [
            ("load", "OctetLoadQuantized", 0, {"ckpt_name": "octet/flux1-dev_int8.safetensors", "backend": "auto"},
             None),
            ("clip", "DualCLIPLoader", 0, {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                           "type": "flux"}, None),
            ("vae", "VAELoader", 0, {"vae_name": "ae.safetensors"}, None),
            ("pos", "CLIPTextEncode", 1, {"text": PROMPT}, "positive"),
            ("guid", "FluxGuidance", 1, {"guidance": 3.5}, None),
            ("neg", "ConditioningZeroOut", 1, {}, "negative (unused at cfg 1)"),
            ("latent", "EmptySD3LatentImage", 1, {"width": 1024, "height": 1024, "batch_size": 1}, None),
            ("sampler", "OctetInt8Sampler", 2, dict(REAL_SAMPLING, steps=20, cfg=1.0, scheduler="simple",
                                                   float_first_steps=0, float_last_steps=0), None),
            ("timing", "PreviewAny", 2, {}, "sampler timing"),
            ("decode", "VAEDecode", 3, {}, None),
            ("image", "SaveImage", 3, {"filename_prefix": "octet/flux_int8_loaded"}, None),
        ],
        "links": [
            ("clip", "CLIP", "pos", "clip"),
            ("pos", "CONDITIONING", "guid", "conditioning"), ("pos", "CONDITIONING", "neg", "conditioning"),
            ("load", "MODEL", "sampler", "model"),
            ("guid", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "timing", "timing", "source"),
            ("sampler", "LATENT", "decode", "samples"), ("vae", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "image", "images"),
        ],
    },
})
REFERENCE = [name for name, spec in SPECS.items() if not spec.get("real_models")]  # run on a CPU in CI

# Runs in the page: builds one spec with the frontend's LiteGraph and returns the serialized graph.
BUILD_JS = """
async (spec) => {
  const app = window.app, LG = window.LiteGraph;
  app.graph.clear();
  const made = {};
  const fail = (msg) => { throw new Error(msg); };
  for (const [key, type, col, widgets, title] of spec.nodes) {
    const node = LG.createNode(type) || fail('unknown node type ' + type);
    if (title) node.title = title;
    app.graph.add(node);
    for (const [name, value] of Object.entries(widgets)) {
      const w = (node.widgets || []).find(w => w.name === name) || fail(type + ' has no widget ' + name);
      w.value = value;
      if (w.callback) w.callback(value);
    }
    made[key] = {node, col};
  }
  for (const [src, out, dst, inp] of spec.links) {
    const a = made[src].node, b = made[dst].node;
    const o = a.findOutputSlot(out), i = b.findInputSlot(inp);
    if (o < 0 || i < 0) fail(`no slot ${src}.${out} -> ${dst}.${inp}`);
    a.connect(o, b, i) || fail(`cannot connect ${src}.${out} -> ${dst}.${inp}`);
  }
  // Layout: columns left to right, nodes stacked; the note on top of column 0.
  const note = LG.createNode('Note');
  note.title = 'About this workflow';
  note.widgets[0].value = spec.note;
  note.size = [420, 260];
  app.graph.add(note);
  const GAP = 36, COLW = 40;
  let x = 0;
  const cols = Math.max(...Object.values(made).map(m => m.col)) + 1;
  for (let c = 0; c < cols; c++) {
    let y = 0, width = 0;
    const members = Object.values(made).filter(m => m.col === c).map(m => m.node);
    if (c === 0) members.unshift(note);
    for (const n of members) {
      const min = n.computeSize();
      n.size = [Math.max(n.size[0], min[0], n.type === 'PreviewAny' ? 420 : 0, n.type === 'SaveImage' ? 360 : 0),
                Math.max(n.size[1], min[1], n.type === 'PreviewAny' ? 200 : 0, n.type === 'SaveImage' ? 300 : 0)];
      n.pos = [x, y];
      y += n.size[1] + GAP + LG.NODE_TITLE_HEIGHT;
      width = Math.max(width, n.size[0]);
    }
    x += width + COLW;
  }
  app.graph.setDirtyCanvas(true, true);
  // As the frontend's own export: JSON text (undefined fields are left out, not written as null).
  return JSON.parse(JSON.stringify(app.graph.serialize()));
}
"""


def build(server: ComfyServer, screenshots: bool, only: list[str] | None = None) -> None:
    os.makedirs(WORKFLOWS, exist_ok=True)
    os.makedirs(API_WORKFLOWS, exist_ok=True)
    with Browser(server) as b:
        for name, spec in SPECS.items():
            if only and name not in only:
                continue
            workflow = b.js(BUILD_JS, {"nodes": [list(n) for n in spec["nodes"]],
                                       "links": [list(l) for l in spec["links"]], "note": spec["note"]})
            workflow.pop("id", None)  # a fresh id per export; templates do not need one
            # Load it back as a user would, and take the API prompt the frontend would queue.
            b.load_workflow(workflow, name)
            prompt = b.to_prompt()
            for path, data in ((os.path.join(WORKFLOWS, name + ".json"), workflow),
                               (os.path.join(API_WORKFLOWS, name + ".json"), prompt)):
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=2)
                    f.write("\n")
            print(f"wrote {name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links, "
                  f"{len(prompt)} API nodes")
        if screenshots:  # each file loaded back and run with the Run button, in order (b loads what a saves)
            for name in REFERENCE:
                b.load_workflow(load_json(os.path.join(WORKFLOWS, name + ".json")), name)
                b.run_and_wait_for_images()
                path = os.path.join(ROOT, "docs", f"workflow_{name}.png")
                b.screenshot(path)
                print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screenshots", action="store_true", help="also write docs/workflow_<name>.png")
    ap.add_argument("--only", nargs="+", choices=list(SPECS), help="build only these workflows")
    args = ap.parse_args()
    with ComfyServer() as server:
        # The loaders list files in models/: give them the names the workflows use (empty placeholders).
        for folder, names in dict(REAL_MODEL_FILES, diffusion_models=REAL_MODEL_FILES["diffusion_models"] +
                                  [CKPT + ".safetensors"]).items():
            for name in names:
                os.makedirs(os.path.dirname(server.path("models", folder, name)), exist_ok=True)
                open(server.path("models", folder, name), "wb").close()
        build(server, args.screenshots, args.only)


if __name__ == "__main__":
    main()
