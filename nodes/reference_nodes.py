"""The reference models (trained Fashion-MNIST UNet / Flux DiT / SD3 MMDiT, their outlier twins, and the seeded random
tiny UNet), their conditioning and empty latents, so workflows run anywhere without downloading weights."""
from __future__ import annotations

from comfy_api.latest import io

from ..fixtures import reference_model

MODELS = ("unet", "dit", "mmdit", "random-tiny")
CLASS_OPTIONS = list(reference_model.CLASSES) + ["unconditional"]


class ReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceModel",
            display_name="Octet Reference Model",
            category="octet/reference",
            description="unet: ComfyUI's SD15 UNet class trained on Fashion-MNIST (eps); dit: ComfyUI's Flux class "
                        "trained on Fashion-MNIST (flow matching); mmdit: ComfyUI's SD3 MMDiT class (joint text/image attention) "
                        "trained on Fashion-MNIST (flow matching); random-tiny: a seeded random SD15 UNet. "
                        "variant 'twin' = same float function with activation outliers (stress test for INT8).",
            inputs=[io.Combo.Input("model", options=list(MODELS), default="unet",
                                   tooltip="unet: SD1.5-class UNet; dit: Flux-class DiT; mmdit: SD3-class MMDiT (all trained on "
                                           "Fashion-MNIST); "
                                           "random-tiny: seeded random SD15 UNet (for tests)."),
                    io.Combo.Input("variant", options=list(reference_model.VARIANTS), default="plain",
                                   tooltip="twin: channels rescaled x20-60 into qkv/fc1 inputs, output unchanged."),
                    io.Int.Input("seed", default=reference_model.DEFAULT_SEED, min=0, max=2**31 - 1, control_after_generate=False,
                                 tooltip="Weights seed of random-tiny (ignored by the trained models).")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, variant="plain", seed=reference_model.DEFAULT_SEED):
        if model == "random-tiny":
            if variant != "plain":
                raise ValueError("random-tiny has no twin; choose model 'unet', 'dit' or 'mmdit' for variant 'twin'.")
            return io.NodeOutput(reference_model.build_tiny_sd15(seed))
        return io.NodeOutput(reference_model.load_reference(model, variant))


class ReferenceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceConditioning",
            display_name="Octet Reference Conditioning",
            category="octet/reference",
            description="Conditioning for a reference model (they have no text encoder): the learned embedding of a "
                        "Fashion-MNIST class ('unconditional' for the negative), or a seeded tensor for random-tiny.",
            inputs=[io.Combo.Input("model", options=list(MODELS), default="unet",
                                   tooltip="The reference model this conditioning is for (same as on Octet Reference Model)."),
                    io.Combo.Input("class_name", options=CLASS_OPTIONS, default="sneaker",
                                   tooltip="Fashion-MNIST class to generate; 'unconditional' for the negative."),
                    io.Int.Input("batch", default=1, min=1, max=64, tooltip="Batch size of the conditioning."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                                 tooltip="Which tensor, for random-tiny.")],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, model="random-tiny", class_name="sneaker", batch=1, seed=0):
        if model == "random-tiny":
            return io.NodeOutput(reference_model.tiny_conditioning(batch=batch, seed=seed))
        return io.NodeOutput(reference_model.class_conditioning(model, class_name, batch=batch))


class ReferenceLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceLatent",
            display_name="Octet Reference Empty Latent",
            category="octet/reference",
            description="An empty LATENT of the right shape for a reference model (unet/random-tiny 4x16x16, "
                        "dit/mmdit 16x8x8: 32x32 images).",
            inputs=[io.Combo.Input("model", options=list(MODELS), default="unet",
                                   tooltip="The reference model the latent is for (sets its shape)."),
                    io.Int.Input("batch", default=1, min=1, max=64, tooltip="Number of images (one noise seed each).")],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, batch):
        return io.NodeOutput(reference_model.empty_latent("unet" if model == "random-tiny" else model, batch))


class ReferenceDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceDecode",
            display_name="Octet Reference Decode",
            category="octet/reference",
            description="Sampled LATENT of a trained reference model -> IMAGE (exact pixel-shuffle; no VAE).",
            inputs=[io.Model.Input("model", tooltip="The reference MODEL (Octet Reference Model) the latent came from."),
                    io.Latent.Input("samples", tooltip="The sampled LATENT.")],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, model, samples):
        img = reference_model.decode(model, samples["samples"])
        return io.NodeOutput(img.repeat(1, 3, 1, 1).movedim(1, -1))
