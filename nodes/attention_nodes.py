"""INT8 Attention: MODEL in, a MODEL whose attention runs q·kᵀ in int8 out (octet/attention.py)."""
from __future__ import annotations

from comfy_api.latest import io

from ..octet import attention


class Int8AttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetInt8Attention",
            display_name="INT8 Attention",
            category="octet",
            description="Run the model's attention with q·kᵀ in INT8 (per-token scales, k smoothed), softmax and "
                        "p·v in bf16/fp16: any MODEL, quantized or not (Flux, SD3, Wan, SDXL...). Calls it does "
                        "not take (masks, head_dim over 128, fp32, CPU) run the host's attention, said "
                        "once in the console. Experimental: on an H100 it is slower than PyTorch's own "
                        "attention (0.5-0.8x per call at SDXL/SD3.5/Flux/Wan shapes; Wan's step 0.87x), so "
                        "Quantize Model never turns it on (docs/BENCHMARKS.md).",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion MODEL. It is not changed."),
                io.Boolean.Input("smooth_k", default=True,
                                 tooltip="Subtract k's mean over tokens before rounding (exact for softmax; keeps "
                                         "keys with a shared channel offset accurate). Off only to compare."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, smooth_k):
        clone, installed = attention.install(model, smooth_k=smooth_k)
        report = ("INT8 Attention: on (q·kᵀ in int8" + (", k smoothed)" if smooth_k else ")") if installed else
                  "INT8 Attention: not installed: this MODEL already has another attention override "
                  "(transformer_options['optimized_attention_override']), which is kept.")
        return io.NodeOutput(clone, report)
