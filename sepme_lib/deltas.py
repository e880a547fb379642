"""Weight increments ``Delta`` (one per erased concept): combine, apply, save, load, merge into diffusers.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb``. A delta holds full-size tensors
``dW`` keyed by the UNet parameter name they add to (``...attn2.to_k.weight``), so that
``theta + sum_i s_i dTheta_i`` is a plain sum and a delta loads into a stock diffusers UNet with
:func:`merge_into_unet`.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "sepme-delta/1"


class BaseModelMismatch(ValueError):
    """A delta was made for another base model than the one it is applied to."""


@dataclass
class Delta:
    """``dTheta_i`` for one concept: ``tensors[param_name] = dW`` plus what made it."""

    name: str
    method: str
    tensors: dict
    base: str  # fingerprint of the base model (T2IModel.fingerprint())
    hparams: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # measurements: steps, stop step, seconds, null dims, ...

    def __repr__(self):
        return (f"Delta({self.name!r}, method={self.method!r}, {len(self.tensors)} tensors, "
                f"base={self.base}, l1={self.l1_norm():.3g})")

    def l1_norm(self) -> float:
        """``||dTheta||_p`` as the paper reports it: ``(1/M) sum_l ||dW_l||_1`` over the M edited tensors."""
        if not self.tensors:
            return 0.0
        return float(sum(t.abs().sum() for t in self.tensors.values()) / len(self.tensors))

    def check_base(self, model) -> None:
        fp = model.fingerprint()
        if fp != self.base:
            raise BaseModelMismatch(
                f"delta {self.name!r} ({self.method}) was made for base model {self.base}, but this model is "
                f"{fp} ({model.name}); apply it to the model it was trained on")

    def to(self, device):
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # ------------------------------------------------------------------------------------ save/load
    def save(self, path) -> Path:
        """One ``.safetensors`` file; name, method, base, hyper-parameters and info in its JSON metadata."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format=FORMAT, name=self.name, method=self.method, base=self.base,
                    hparams=json.dumps(self.hparams), info=json.dumps(self.info))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "Delta":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no delta file at {path}")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a sepme delta (metadata format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); save deltas with Delta.save")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(meta["name"], meta["method"], tensors, meta["base"], json.loads(meta["hparams"]),
                   json.loads(meta["info"]))


# ---------------------------------------------------------------------------------------- combining
def _scales(deltas, scales):
    deltas = list(deltas)
    if scales is None:
        return deltas, [1.0] * len(deltas)
    if isinstance(scales, dict):
        unknown = set(scales) - {d.name for d in deltas}
        if unknown:
            raise KeyError(f"scales name unknown deltas {sorted(unknown)}; deltas are {[d.name for d in deltas]}")
        return deltas, [float(scales.get(d.name, 0.0)) for d in deltas]
    scales = list(scales)
    if len(scales) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(scales)} scales")
    return deltas, [float(s) for s in scales]


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
    """``{param_name: W + sum_i s_i dW_i}`` for every parameter any delta touches (checks the base)."""
    deltas = list(deltas)
    for d in deltas:
        d.check_base(model)
    total = combine(deltas, scales)
    params = dict(model.unet.named_parameters())
    missing = [k for k in total if k not in params]
    if missing:
        raise KeyError(f"delta tensors name parameters this UNet does not have: {missing[:3]}")
    return {k: params[k].detach() + v.to(params[k].device, params[k].dtype) for k, v in total.items()}


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
