"""Octet core: INT8 quantization of diffusion models in plain torch (no ComfyUI import here)."""
from .api import OctetError, QuantResult, quantizable_layers, quantize_
from .config import (DynamicW8A8Config, QuantConfig, StaticW8A8Config, WeightOnlyConfig, config_for_mode,
                     config_from_dict, MODES)
from .modules import QuantConv2d, QuantLinear
from .report import LayerRecord, QuantReport

__all__ = ["OctetError", "QuantResult", "quantizable_layers", "quantize_", "DynamicW8A8Config", "QuantConfig",
           "StaticW8A8Config", "WeightOnlyConfig", "config_for_mode", "config_from_dict", "MODES",
           "QuantConv2d", "QuantLinear", "LayerRecord", "QuantReport"]
