"""Octet's own socket types, shared by the nodes that produce and consume them."""
from comfy_api.latest import io

Policy = io.Custom("OCTET_POLICY")
Calibration = io.Custom("OCTET_CALIBRATION")
