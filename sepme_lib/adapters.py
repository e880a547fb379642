"""Deltas as live diffusers LoRA adapters: ``theta + sum_i s_i dTheta_i`` computed by ``set_adapters``.

Introduced in ``notebooks/05_interactive_combination.ipynb``: the widget's ``backend="diffusers"`` moves its sliders
through :meth:`AdapterUNet.set_scales` (diffusers' ``set_adapters``) instead of the library's ``combine``; both give
the same outputs to float rounding (``tests/test_lora.py``: <= 1e-5 relative on the bundled model and on a random SD
architecture, for scales 0, negative and > 1).

What this module takes care of (each is tested):

* ``load_lora_adapter`` filters keys by ``prefix``, which defaults to ``"transformer"``: a UNet adapter (keys
  ``unet.``) then loads *nothing*, silently. :func:`load_adapter` passes ``prefix="unet"`` and checks that every
  layer received the adapter. Given a folder, ``load_lora_adapter`` looks for a ``.bin`` file unless told
  ``weight_name="pytorch_lora_weights.safetensors"`` (``pipe.load_lora_weights`` finds it by itself).
* an adapter that changes a bias (G-CiRs and the relatives that train ``to_out``) needs peft's ``lora_bias``, one
  switch for all its layers: ``set_adapters`` is exact, but ``fuse_lora`` is impossible on the bias-free to_q/k/v.
* adapter names may not contain ``.`` (peft keeps adapters in ``ModuleDict``s): refused with the fix.
* the peft config comes from the file's metadata with ``alpha_pattern = rank_pattern``: every layer scales by
  ``alpha / r = 1`` (metadata without an alpha pattern makes layers of another rank scale by ``r / r_l``, e.g. 2).
* the adapters take the UNet's dtype (float16 adapters on a float16 UNet): :attr:`AdapterUNet.dtype` says so.
* the UNet with adapters is a copy: the model's own UNet keeps its parameter names (peft renames
  ``to_k.weight`` to ``to_k.base_layer.weight``), so the library's ``applied``/``combine`` keep working beside it.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from contextlib import contextmanager, nullcontext

import diffusers
import torch

from .lora import PREFIX, WEIGHTS, LoraError, LoraExport, adapter_name, read

MIN_DIFFUSERS = (0, 34)  # the first diffusers that reads a LoRA file's lora_adapter_metadata (rank/alpha patterns)


def check_backend() -> None:
    """Refuse, with the fix, a diffusers too old to read per-layer alphas or a missing peft."""
    version = tuple(int(x) for x in diffusers.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_DIFFUSERS:
        raise LoraError(f"diffusers {diffusers.__version__} cannot read per-layer LoRA alphas from a file's metadata "
                        f"(layers of another rank would scale wrongly); install diffusers>=0.34")
    if importlib.util.find_spec("peft") is None:
        raise LoraError("diffusers' LoRA adapters need peft: pip install 'peft>=0.17'")


def lora_layers(unet, name: str) -> int:
    """How many layers of ``unet`` hold the adapter ``name``."""
    return sum(1 for m in unet.modules() if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {}))


def _source(source):
    """``(state_dict, config)`` of a LoRA folder, a :class:`LoraExport` or a ``Delta`` (exported exactly)."""
    if isinstance(source, LoraExport):
        return source.state_dict, source.config
    if hasattr(source, "to_lora"):
        exp = source.to_lora()
        return exp.state_dict, exp.config
    _, _, cfg = read(source)  # checks the folder; diffusers reads the file itself below
    return str(source), cfg


def load_adapter(unet, source, name: str) -> str:
    """Load ``source`` (a LoRA folder, a :class:`LoraExport` or a ``Delta``) into a diffusers ``unet`` as adapter
    ``name`` with ``unet.load_lora_adapter(..., prefix="unet")``; checks that every layer received it. Returns the
    name."""
    check_backend()
    if not isinstance(name, str) or not name or "." in name:
        raise LoraError(f"adapter name {name!r} is not allowed: peft refuses '.' in adapter names; use "
                        f"{adapter_name(name or 'adapter')!r} (lora.adapter_name)")
    if name in getattr(unet, "peft_config", {}):
        raise LoraError(f"this UNet already has an adapter named {name!r}; give another name or delete it first "
                        "(unet.delete_adapters)")
    sd, cfg = _source(source)
    kw = (dict(weight_name=WEIGHTS) if isinstance(sd, str)
          else dict(metadata={f"{PREFIX}.{k}": v for k, v in cfg.items()}))
    with warnings.catch_warnings():  # peft warns on every adapter after the first that the model has several, and
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # on lora_bias (module docstring)
        warnings.filterwarnings("ignore", message="`lora_bias=True` was passed")
        unet.load_lora_adapter(sd, prefix=PREFIX, adapter_name=name, **kw)
    want = len(cfg.get("target_modules", [])) or 1
    got = lora_layers(unet, name)
    if got < want:
        raise LoraError(f"adapter {name!r} reached {got} of {want} layers; the file's keys do not match this UNet "
                        "(another architecture?)")
    return name


class AdapterUNet:
    """A copy of a diffusers UNet with one LoRA adapter per delta; :meth:`set_scales` is ``set_adapters``.

    ``deltas``: ``Delta`` objects, LoRA folders or :class:`LoraExport`s (``rank``/``rtol`` truncate deltas on
    export). ``names``: adapter names (default: from the delta names, :func:`lora.adapter_name`)."""

    def __init__(self, unet, deltas, names=None, rank: int | None = None, rtol: float | None = None):
        deltas = list(deltas)
        if not deltas:
            raise LoraError("AdapterUNet needs at least one delta or LoRA folder")
        check_backend()
        if names is None:
            names = [adapter_name(getattr(d, "name", None) or getattr(getattr(d, "delta", None), "name", None)
                                  or str(d).rstrip("/").rsplit("/", 1)[-1]) for d in deltas]
        names = list(names)
        if len(names) != len(deltas) or len(set(names)) != len(names):
            raise LoraError(f"need one distinct adapter name per delta, got {names}")
        self.unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.names = names
        for d, n in zip(deltas, names):
            load_adapter(self.unet, d.to_lora(rank, rtol) if hasattr(d, "to_lora") else d, n)
        self.scales = [1.0] * len(names)
        self.set_scales(self.scales)

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' dtype: the UNet's (float16 adapters on a float16 UNet)."""
        for m in self.unet.modules():
            if hasattr(m, "lora_A") and self.names[0] in m.lora_A:
                return m.lora_A[self.names[0]].weight.dtype
        return self.unet.dtype

    def set_scales(self, scales) -> list[float]:
        """``theta + sum_i s_i dTheta_i``: ``unet.set_adapters(names, scales)`` (a list, or a dict by name)."""
        if isinstance(scales, dict):
            unknown = set(scales) - set(self.names)
            if unknown:
                raise KeyError(f"scales name unknown adapters {sorted(unknown)}; adapters are {self.names}")
            scales = [scales.get(n, 0.0) for n in self.names]
        scales = [float(s) for s in scales]
        if len(scales) != len(self.names):
            raise ValueError(f"{len(self.names)} adapters but {len(scales)} scales; give one scale per adapter")
        if not all(math.isfinite(s) for s in scales):
            raise ValueError(f"scales must be finite numbers, got {scales}")
        self.unet.set_adapters(self.names, scales)
        self.unet.requires_grad_(False)  # peft's set_adapter marks the active adapters trainable again
        self.scales = scales
        return scales

    @contextmanager
    def active(self, model, scales=None):
        """``with adapters.active(model, scales): model.sample(...)`` runs the model's sampler on this UNet (the
        model's own UNet comes back on exit)."""
        if scales is not None:
            self.set_scales(scales)
        own = model.unet
        model.unet = self.unet
        try:
            yield model
        finally:
            model.unet = own


# ------------------------------------------------------------------------------------------ the widget's backend
BACKENDS = ("library", "diffusers")


def make_backend(model, deltas, backend: str = "library"):
    """What computes ``theta + sum_i s_i dTheta_i`` for notebook 05's widget: ``"library"`` -> ``None`` (the weights
    ``W + sum_i s_i dW_i`` from ``deltas.combine``), ``"diffusers"`` -> an :class:`AdapterUNet` (each delta a LoRA
    adapter in a copy of the UNet; the sliders set the ``set_adapters`` weights). Both give the same images to float
    rounding."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    return AdapterUNet(model.unet, deltas) if backend == "diffusers" else None


def backend_context(adapters, model, scales):
    """``adapters.active(model, scales)``, or a context that does nothing when ``adapters`` is ``None`` (the library
    backend, whose caller passes the combined weights instead)."""
    return nullcontext(model) if adapters is None else adapters.active(model, scales)
