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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import config
from .config import BadType, BadValue, NotFound, SepmeError, UnknownName
from .storage import atomic_file

FORMAT = "sepme-delta/1"
META_KEYS = ("format", "name", "method", "base", "hparams", "info")


class BaseModelMismatch(SepmeError, ValueError):
    """A delta was made for another base model than the one it is applied to."""


class DeltaFileError(SepmeError, ValueError):
    """A delta file cannot be read or written (the message names the file and the fix)."""


def _finite_or_raise(tensors: dict, what: str) -> None:
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise BadValue(f"{what}: tensor {k!r} holds NaN or inf values; a training run diverged or the file is "
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
            raise BadValue(f"Delta: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise BadValue(f"delta {self.name!r} has no tensors: nothing to add to the model")
        bad = [k for k, v in self.tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise BadType(f"delta {self.name!r}: entries {bad[:3]} are not tensors")

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
                raise UnknownName(f"delta {self.name!r}: this UNet has no parameter {k!r}; apply the delta to the "
                                  "model it was made for")
            if tuple(v.shape) != tuple(params[k].shape):
                raise BadValue(f"delta {self.name!r}: tensor {k!r} has shape {tuple(v.shape)} but the parameter is "
                                 f"{tuple(params[k].shape)}")

    # ------------------------------------------------------------------------------------ save/load
    def save(self, path, overwrite: bool = False) -> Path:
        """Write one ``.safetensors`` file (atomically: a killed or failed save leaves no partial file and the old file
        intact); returns its path. The name is kept as given, ``.safetensors`` is appended when it does not end so
        (``"run.striped"`` -> ``run.striped.safetensors``). An existing file is replaced only when it holds the same
        delta (same name, method and base model: a re-run) or with ``overwrite=True``."""
        if isinstance(path, str) and not path.strip():
            raise DeltaFileError(f"cannot save delta {self.name!r}: the path is empty; give a file name such as "
                                 f"'{self.name}.safetensors'")
        if not isinstance(path, (str, os.PathLike)):
            raise BadType(f"Delta.save: path must be a file name (str or Path), got {type(path).__name__}")
        if "\x00" in str(path):
            raise DeltaFileError(f"cannot save delta {self.name!r} to {str(path)!r}: a path cannot hold a NUL character")
        raw = os.fspath(path)
        path = Path(path)
        if path.name in ("", ".", "..") or raw.rstrip().endswith(("/", os.sep, "/.", "/..")):
            raise DeltaFileError(f"cannot save delta {self.name!r} to {str(path)!r}: not a file name; give a file "
                                 f"name such as '{self.name}.safetensors'")
        try:
            if path.suffix != ".safetensors" and path.is_dir():
                raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: it is a folder; give a file name "
                                     f"inside it, e.g. {path / (self.name + '.safetensors')}")
            if path.suffix != ".safetensors":
                path = path.with_name(path.name + ".safetensors")
            return self._save(path, overwrite)
        except OSError as e:
            raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: {e.strerror or e}; give a writable "
                                 "path with a shorter name") from None

    def _save(self, path: Path, overwrite: bool) -> Path:
        if path.is_dir():
            raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: it is a folder; give a file name "
                                 "ending in .safetensors")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: {parent} is a file, not a folder")
        if path.exists() and not overwrite:
            self._check_replace(path)
        self.check_finite()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeltaFileError(f"cannot save delta {self.name!r}: could not create {path.parent} ({e})") from None
        meta = dict(format=FORMAT, name=self.name, method=self.method, base=self.base, version=self.version,
                    hparams=json.dumps(self.hparams, default=str), info=json.dumps(self.info, default=str))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta), DeltaFileError)

    def _check_replace(self, path: Path) -> None:
        """Refuse to replace ``path`` unless it holds this same delta (name, method, base)."""
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError):
            meta = {}
        same = meta.get("format") == FORMAT and all(meta.get(k) == getattr(self, k) for k in ("name", "method", "base"))
        if not same:
            held = (f"delta {meta.get('name')!r} ({meta.get('method')})" if meta.get("format") == FORMAT
                    else "a file that is not a sepme delta")
            raise DeltaFileError(f"cannot save delta {self.name!r} to {path}: the file exists and holds {held}; "
                                 "give another file name, or pass overwrite=True to replace it")

    @classmethod
    def load(cls, path, device="cpu") -> "Delta":
        """Read a file written by :meth:`save`; every failure names the file and what is wrong with it."""
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip() or "\x00" in str(path):
            raise DeltaFileError(f"Delta.load: path must name a .safetensors file, got {path!r}")
        path = Path(path)
        try:
            exists = path.exists()
        except OSError as e:
            raise DeltaFileError(f"Delta.load: cannot read {path} ({e.strerror or e})") from None
        if not exists:
            raise NotFound(f"no delta file at {path}; check the path (Delta.save wrote it with .safetensors appended)")
        try:
            dev = config.get_device(str(device))
        except (ValueError, RuntimeError, TypeError) as e:
            raise BadValue(f"Delta.load({str(path)!r}, device={device!r}): {e}") from None
        if path.is_dir():
            raise DeltaFileError(f"{path} is a folder; a delta is one .safetensors file (a LoRA folder loads with "
                                 "Delta.from_lora)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
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
            if not isinstance(parsed[key], dict):
                raise DeltaFileError(f"{path}: metadata field {key!r} must be a JSON object ({{...}}), got "
                                     f"{meta[key][:40]!r}; the file was not written by Delta.save")
        if not isinstance(meta["name"], str) or not meta["name"].strip():
            raise DeltaFileError(f"{path}: metadata field 'name' is empty; the file was not written by Delta.save "
                                 "(load it, set .name and save it again)")
        if not tensors:
            raise DeltaFileError(f"{path} holds no tensors; the file was not written by Delta.save")
        _finite_or_raise(tensors, f"{path}")
        tensors = {k: v.to(dev) for k, v in tensors.items()}
        return cls(meta["name"], meta["method"], tensors, meta["base"], parsed["hparams"], parsed["info"],
                   meta.get("version", "unknown"))


# ---------------------------------------------------------------------------------------- combining
def _scales(deltas, scales):
    if isinstance(deltas, Delta):
        deltas = [deltas]
    if isinstance(deltas, (str, bytes, dict)) or not hasattr(deltas, "__iter__"):
        raise BadType(f"deltas must be a list of Delta objects, got {type(deltas).__name__}")
    deltas = list(deltas)
    bad = [d for d in deltas if not isinstance(d, Delta)]
    if bad:
        raise BadType(f"deltas: expected Delta objects, got {type(bad[0]).__name__}")
    names = [d.name for d in deltas]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadValue(f"delta(s) {twice} appear more than once in the combination; give each delta once and set "
                       "its strength with a scale (e.g. scales=[2.0])")
    for i, a in enumerate(deltas):
        for b in deltas[:i]:
            if same_tensors(a, b):
                raise BadValue(f"deltas {b.name!r} and {a.name!r} hold the same increment (the same weights under two "
                               "names, e.g. one LoRA folder copied and renamed): it would be applied twice. Give it "
                               "once and set its strength with a scale (e.g. scales=[2.0])")
    if scales is None:
        return deltas, [1.0] * len(deltas)
    if isinstance(scales, dict):
        unknown = set(scales) - set(names)
        if unknown:
            raise UnknownName(f"scales name unknown deltas {sorted(unknown)}; deltas are {names}")
        missing = [n for n in names if n not in scales]
        if missing:
            raise BadValue(f"scales gives no scale for delta(s) {missing}; give every delta a scale (0 leaves one out)")
        scales = [scales[n] for n in names]
    if isinstance(scales, (str, bytes, numbers.Number, torch.Tensor)) or not hasattr(scales, "__iter__"):
        raise BadType(f"scales must be a list of numbers (one per delta) or a dict by delta name, got {scales!r}")
    scales = list(scales)
    if len(scales) != len(deltas):
        raise BadValue(f"{len(deltas)} deltas but {len(scales)} scales; give one scale per delta")
    out = []
    for n, s in zip(names, scales):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) and not (isinstance(s, torch.Tensor) and s.numel() == 1):
            raise BadType(f"the scale of delta {n!r} must be a number, got {s!r}")
        s = float(s)
        if not math.isfinite(s):
            raise BadValue(f"the scale of delta {n!r} is {s}; scales must be finite numbers")
        out.append(s)
    return deltas, out


def same_tensors(a: Delta, b: Delta) -> bool:
    """Whether two deltas add the same increment (same parameters, equal tensors up to float32 rounding)."""
    if set(a.tensors) != set(b.tensors) or all(not bool(v.any()) for v in a.tensors.values()):
        return False
    for k, v in a.tensors.items():
        w = b.tensors[k]
        if v.shape != w.shape or not torch.allclose(v.float().cpu(), w.float().cpu(), rtol=1e-5, atol=1e-8):
            return False
    return True


def combine(deltas, scales=None) -> dict:
    """``sum_i s_i dTheta_i`` as ``{param_name: tensor}`` (scales: list, dict by name, or all ones)."""
    deltas, scales = _scales(deltas, scales)
    out: dict = {}
    for d, s in zip(deltas, scales):
        if s == 0.0:
            continue
        for k, v in d.tensors.items():
            out[k] = out[k] + s * v if k in out else s * v
    for k, v in out.items():
        if not torch.isfinite(v).all():
            raise BadValue(f"scales {scales} make the combination overflow (tensor {k!r} is not finite in "
                           f"{v.dtype}); use scales of moderate size (|s| <= 10 covers every use in the course)")
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
