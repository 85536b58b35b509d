"""Octet: INT8 diffusion models for ComfyUI.

ComfyUI imports this file from custom_nodes/<folder>/. It stays tiny and imports the host's API
only inside comfy_entrypoint(), so the core (``octet``, ``kernels``) imports without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import extension
    return await extension.comfy_entrypoint()
