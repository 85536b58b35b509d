"""Octet's own socket types, shared by the nodes that produce and consume them. Named in capitals as
ComfyUI names its types (MODEL, CLIP), so they never read like the octet classes they carry
(octet.policy.Policy, octet.calibration.Calibration)."""
from comfy_api.latest import io

POLICY = io.Custom("OCTET_POLICY")
CALIBRATION = io.Custom("OCTET_CALIBRATION")
