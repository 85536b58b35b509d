"""ComfyUI adapters: V3 nodes over the octet core. Modules here may import ComfyUI."""
