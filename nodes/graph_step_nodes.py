"""CUDA Graph Step: MODEL in, a MODEL whose diffusion-model calls replay captured CUDA graphs out."""
from __future__ import annotations

from comfy_api.latest import io

from . import graph_step


class CudaGraphStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetCudaGraphStep",
            display_name="CUDA Graph Step",
            category="octet",
            description="Capture the diffusion model's forward once per input shape as a CUDA graph and replay it "
                        "every step (any MODEL, quantized or not; any sampler). Unsafe cases (CPU, lowvram, hooks, "
                        "unknown patches) run eager and say why once in the console.",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion MODEL, float or Octet INT8. It is not changed."),
                io.Int.Input("max_graphs", default=4, min=1, max=16,
                             tooltip="Graphs kept at once (one per latent size / batching / conditioning shape); "
                                     "each holds its own GPU memory, logged when captured."),
                io.Int.Input("warmup_runs", default=2, min=1, max=5,
                             tooltip="Eager runs before each capture (kernel autotuning must finish first)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="report",
                                      tooltip="What will be captured; per-graph memory is logged at capture.")],
        )

    @classmethod
    def execute(cls, model, max_graphs, warmup_runs):
        clone, step = graph_step.install(model, capacity=max_graphs, warmup=warmup_runs)
        device = getattr(model, "load_device", None)
        note = ("" if step.backend.supports(device) else
                f"\nThis MODEL loads on {device}: sampling will run eager (CUDA graphs need a CUDA device).")
        report = (f"CUDA Graph Step: up to {max_graphs} graphs, {warmup_runs} warm-up run(s) before each capture; "
                  f"graphs are captured during sampling and each capture's memory is logged.{note}")
        return io.NodeOutput(clone, report)
