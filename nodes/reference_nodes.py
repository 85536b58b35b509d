"""The embedded reference model, so workflows run anywhere without downloading weights."""
from __future__ import annotations

from comfy_api.latest import io

from . import reference_model


class ReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceModel",
            display_name="Octet Reference Model",
            category="octet/reference",
            description="A small SD1.5-architecture UNet (ComfyUI's own classes), deterministic weights. "
                        "For trying Octet without downloading a model.",
            inputs=[io.Int.Input("seed", default=reference_model.DEFAULT_SEED, min=0, max=2**31 - 1,
                                 tooltip="Seed of the weights; the same seed gives the same model everywhere.")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, seed):
        return io.NodeOutput(reference_model.build_tiny_sd15(seed))


class ReferenceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetReferenceConditioning",
            display_name="Octet Reference Conditioning",
            category="octet/reference",
            description="Conditioning for the reference model (it has no text encoder): a seeded context tensor.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Which conditioning."),
                    io.Int.Input("batch", default=1, min=1, max=64, tooltip="Batch size of the conditioning.")],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, seed, batch):
        return io.NodeOutput(reference_model.tiny_conditioning(batch=batch, seed=seed))
