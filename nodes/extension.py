"""The ComfyExtension that lists Octet's nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host_compat
from .attention_nodes import Int8AttentionNode
from .attribution_nodes import StaticAttribution
from .calibrate_nodes import Calibrate, CalibrationPrompts, LoadCalibration, SaveCalibration
from .checkpoint_nodes import LoadQuantized, SaveQuantized
from .eval_nodes import Evaluate, Profile
from .graph_step_nodes import CudaGraphStep
from .policy_nodes import MixedPrecisionPolicy, SensitivityPolicy
from .qat_nodes import QATFineTune
from .quantize_nodes import QuantizeModel
from .reference_nodes import ReferenceConditioning, ReferenceDecode, ReferenceLatent, ReferenceModel
from .sampler_nodes import Int8Sampler

NODES = [QuantizeModel, SaveQuantized, LoadQuantized, ReferenceModel, ReferenceConditioning, MixedPrecisionPolicy,
         SensitivityPolicy, Calibrate, SaveCalibration, LoadCalibration, CalibrationPrompts, Int8Sampler,
         QATFineTune, StaticAttribution,
         ReferenceLatent, ReferenceDecode, Evaluate, Profile, CudaGraphStep, Int8AttentionNode]


class OctetExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> OctetExtension:
    host_compat.sync_core()
    return OctetExtension()
