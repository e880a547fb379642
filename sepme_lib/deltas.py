"""Weight increments ``Delta`` (one per erased concept): combine, apply, save, load, merge.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb``. A delta holds full-size tensors ``dW`` keyed by the
UNet parameter name they add to (``...attn2.to_k.weight``), so that ``theta + sum_i s_i dTheta_i`` is a plain sum
(the paper's combinations, Tables 3-5) and a delta loads into a stock diffusers UNet (:func:`merge_into_unet`, or as
a LoRA adapter: ``lora.py``).

A delta file is one ``.safetensors`` file; its metadata records what made it: the method, the settings, the erased
prompts, anchors and protected prompts (``info``), the library version and the base-model fingerprint.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import config

FORMAT = "sepme-delta/1"
META_KEYS = ("format", "name", "method", "base", "hparams", "info")


class BaseModelMismatch(ValueError):
    """A delta was made for another base model than the one it is applied to."""


class DeltaFileError(ValueError):
    """A delta file cannot be read or written (the message names the file and the fix)."""


def _finite_or_raise(tensors: dict, what: str) -> None:
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"{what}: tensor {k!r} holds NaN or inf values; a training run diverged or the file is "
                             "damaged. Retrain the delta (with a lower learning rate).")


@dataclass
class Delta:
    """``dTheta_i`` for one concept: ``tensors[param_name] = dW`` plus what made it.

    ``info`` holds what the run measured and used: ``prompts`` (erased), ``anchors``, ``protected`` (the prompts
    stacked into ``A_i``), steps, stop reason, seconds, null dimension, the loss history.
    """

    name: str
    method: str
    tensors: dict
    base: str  # fingerprint of the base model (T2IModel.fingerprint())
    hparams: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    version: str = config.VERSION

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a delta needs a non-empty name, got {self.name!r}")
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise ValueError(f"delta {self.name!r} has no tensors: nothing to add to the model")
        bad = [k for k, v in self.tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"delta {self.name!r}: entries {bad[:3]} are not tensors")

    def __repr__(self):
        return (f"Delta({self.name!r}, method={self.method!r}, {len(self.tensors)} tensors, "
                f"base={self.base}, l1={self.l1_norm():.3g})")

    def l1_norm(self) -> float:
        """``||dTheta||_p`` as the paper reports it: ``(1/M) sum_l ||dW_l||_1`` over the M edited tensors."""
        return float(sum(t.abs().sum() for t in self.tensors.values()) / len(self.tensors))

    def check_finite(self) -> "Delta":
        _finite_or_raise(self.tensors, f"delta {self.name!r}")
        return self

    def check_base(self, model) -> None:
        """Refuse a model other than the one the delta was made for, and tensors of another shape."""
        fp = model.fingerprint()
        if fp != self.base:
            raise BaseModelMismatch(
                f"delta {self.name!r} ({self.method}) was made for base model {self.base}, but this model is "
                f"{fp} ({model.name}); apply it to the model it was trained on")
        params = dict(model.unet.named_parameters())
        for k, v in self.tensors.items():
            if k not in params:
                raise KeyError(f"delta {self.name!r}: this UNet has no parameter {k!r}")
            if tuple(v.shape) != tuple(params[k].shape):
                raise ValueError(f"delta {self.name!r}: tensor {k!r} has shape {tuple(v.shape)} but the parameter is "
                                 f"{tuple(params[k].shape)}")

    # ------------------------------------------------------------------------------------ save/load
    def save(self, path) -> Path:
        """Write one ``.safetensors`` file (atomically: a killed save leaves no partial file); returns its path."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        if path.is_dir():
            raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: it is a folder; give a file name "
                                 "ending in .safetensors")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: {parent} is a file, not a folder")
        self.check_finite()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format=FORMAT, name=self.name, method=self.method, base=self.base, version=self.version,
                    hparams=json.dumps(self.hparams, default=str), info=json.dumps(self.info, default=str))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "Delta":
        """Read a file written by :meth:`save`; every failure names the file and what is wrong with it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no delta file at {path}")
        if path.is_dir():
            raise DeltaFileError(f"{path} is a folder; a delta is one .safetensors file (a LoRA folder loads with "
                                 "Delta.from_lora)")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
                                 "truncated or of another format. Save deltas with Delta.save") from None
        if meta.get("format") != FORMAT:
            raise DeltaFileError(f"{path} is not a sepme delta (metadata format {meta.get('format')!r}, expected "
                                 f"{FORMAT!r}); save deltas with Delta.save")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise DeltaFileError(f"{path}: metadata lacks {missing}; the file was not written by Delta.save")
        parsed = {}
        for key in ("hparams", "info"):
            try:
                parsed[key] = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise DeltaFileError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from None
        _finite_or_raise(tensors, f"{path}")
        return cls(meta["name"], meta["method"], tensors, meta["base"], parsed["hparams"], parsed["info"],
                   meta.get("version", "unknown"))


# ---------------------------------------------------------------------------------------- combining
def _scales(deltas, scales):
    deltas = list(deltas)
    bad = [d for d in deltas if not isinstance(d, Delta)]
    if bad:
        raise TypeError(f"expected Delta objects, got {type(bad[0]).__name__}")
    names = [d.name for d in deltas]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"delta(s) {twice} appear more than once in the combination; give each delta once and set "
                         "its strength with a scale (e.g. scales=[2.0])")
    if scales is None:
        return deltas, [1.0] * len(deltas)
    if isinstance(scales, dict):
        unknown = set(scales) - set(names)
        if unknown:
            raise KeyError(f"scales name unknown deltas {sorted(unknown)}; deltas are {names}")
        scales = [scales.get(n, 0.0) for n in names]
    scales = list(scales)
    if len(scales) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(scales)} scales; give one scale per delta")
    out = []
    for n, s in zip(names, scales):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) and not (isinstance(s, torch.Tensor) and s.numel() == 1):
            raise TypeError(f"the scale of delta {n!r} must be a number, got {s!r}")
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"the scale of delta {n!r} is {s}; scales must be finite numbers")
        out.append(s)
    return deltas, out


def combine(deltas, scales=None) -> dict:
    """``sum_i s_i dTheta_i`` as ``{param_name: tensor}`` (scales: list, dict by name, or all ones)."""
    deltas, scales = _scales(deltas, scales)
    out: dict = {}
    for d, s in zip(deltas, scales):
        if s == 0.0:
            continue
        for k, v in d.tensors.items():
            out[k] = out[k] + s * v if k in out else s * v
    return out


def edited_weights(model, deltas, scales=None) -> dict:
    """``{param_name: W + sum_i s_i dW_i}`` for every parameter any delta touches (checks base and shapes)."""
    deltas = list(deltas)
    for d in deltas:
        d.check_base(model)
        d.check_finite()
    total = combine(deltas, scales)
    params = dict(model.unet.named_parameters())
    # in float32, then cast to the base weights' dtype (fp16 on a GPU)
    return {k: (params[k].detach().float() + v.to(params[k].device, torch.float32)).to(params[k].dtype)
            for k, v in total.items()}


@contextmanager
def applied(model, deltas, scales=None):
    """``with applied(model, deltas, scales): ...`` runs the model as ``theta + sum s_i dTheta_i``; on exit
    the original weights come back bit-exact."""
    with model.edited(edited_weights(model, deltas, scales)):
        yield model


def merge_into_unet(unet, deltas, scales=None):
    """Add ``sum s_i dTheta_i`` into a stock diffusers ``UNet2DConditionModel`` in place (no base check)."""
    total = combine(deltas, scales)
    params = dict(unet.named_parameters())
    missing = [k for k in total if k not in params]
    if missing:
        raise KeyError(f"this UNet has no parameters named {missing[:3]}; was the delta made for another "
                       "architecture?")
    with torch.no_grad():
        for k, v in total.items():
            params[k].add_(v.to(params[k].device, params[k].dtype))
    return unet
