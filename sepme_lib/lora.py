"""A ``Delta`` as a standard diffusers LoRA adapter: factorisation, the file format, the model card.

Introduced in ``notebooks/05_interactive_combination.ipynb`` (the widget can combine through diffusers adapters) and
used by the command line (``sepme erase`` writes one LoRA folder per concept). Each ``dW`` (``d_out x d_in``) is
factored by an SVD in float64, ``dW = U diag(s) V^T``, into ``lora_B = U diag(s)`` (``d_out x r``) and
``lora_A = V^T`` (``r x d_in``). At full rank (``r = min(d_out, d_in)``, the default) the factorisation is exact to
float32 rounding; a truncated rank (``rank=`` or ``rtol=``) keeps the largest singular directions. Since the kept
right singular vectors span a subspace of the row space of ``dW``, and SepME's ``dW = beta w S^T`` has its rows in the
null space ``span(S)``, a truncated SepME adapter still leaves every protected prompt's keys and values unchanged (the
leakage certificate survives); what truncation costs is erasure strength, and :meth:`LoraExport.summary` prints it.

A folder holds ``pytorch_lora_weights.safetensors`` (keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, plus
``lora_B.bias`` when a bias changed) with two metadata entries: ``lora_adapter_metadata`` (the peft ``LoraConfig``
diffusers >= 0.34 reads: per-layer ``rank_pattern`` *and* ``alpha_pattern``, so that every layer scales by exactly
``alpha / r = 1``) and ``sepme_lora`` (what made it: concept, method, settings, protected prompts, ranks, errors, the
leakage certificate), and ``README.md``, a model card. ``pipe.load_lora_weights(folder, adapter_name=...)`` loads it
with nothing from this library; ``pipe.set_adapters(names, weights)`` then runs ``theta + sum_i s_i dTheta_i``.

The three ``Delta`` methods ``to_lora``, ``save_lora`` and ``from_lora`` are the functions of this module, attached to
the class below (``deltas.py`` sits in a lower layer and cannot import this one); importing ``sepme_lib`` attaches them.
The diffusers side (adapters in a UNet, the widget's backend) is ``adapters.py``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import config
from .card import model_card
from .concepts import ConceptError, concept_set
from .config import BadType, NotFound, SepmeError
from .deltas import Delta, DeltaFileError
from .storage import atomic_folder

WEIGHTS = "pytorch_lora_weights.safetensors"
CARD = "README.md"
PREFIX = "unet"
DIFFUSERS_META = "lora_adapter_metadata"
SEPME_META = "sepme_lora"
FORMAT = "sepme-lora/1"


class LoraError(SepmeError, ValueError):
    """A LoRA export or folder cannot be made or read (the message names the problem and the fix)."""


def adapter_name(name: str) -> str:
    """A diffusers/peft adapter name for a delta name: runs of characters other than letters, digits, ``_`` and ``-``
    become ``_`` (peft stores adapters in ``ModuleDict``s, which refuse ``.``: ``"Van Gogh" -> "Van_Gogh"``)."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_")
    if not out:
        raise LoraError(f"cannot make an adapter name from {name!r}; give adapter names explicitly")
    return out


def factorize(dW: torch.Tensor, rank: int | None = None, rtol: float | None = None):
    """``dW ~ B @ A`` with ``B = U diag(s)``, ``A = V^T`` from an SVD in float64 (float32 results).

    Keeps every singular direction (exact) unless ``rtol`` (drop ``s_i <= rtol * s_max``) or ``rank`` (keep at most
    ``rank``) say otherwise; at least one is kept. Returns ``(B, A, dict(rank, full_rank, error))`` with ``error`` =
    ``||dW - B A||_F / ||dW||_F`` measured in float64 on the float32 factors."""
    if not isinstance(dW, torch.Tensor) or dW.dim() != 2:
        raise LoraError(f"only matrices (linear-layer weights) factor into LoRA, got shape {tuple(dW.shape)}")
    W = dW.detach().to("cpu", torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    full = s.numel()
    keep = full
    if rtol is not None:
        keep = int((s > rtol * s[0]).sum()) if s[0] > 0 else full
    if rank is not None:
        keep = min(keep, rank)
    keep = max(1, keep)
    B, A = (U[:, :keep] * s[:keep]).float().contiguous(), Vh[:keep].float().contiguous()
    norm = float(W.norm())
    err = float((W - B.double() @ A.double()).norm()) / norm if norm > 0 else 0.0
    return B, A, dict(rank=keep, full_rank=full, error=err)


def _check_truncation(rank, rtol):
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoraError(f"rank must be None (exact) or a whole number >= 1, got {rank!r}")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1
                             or not math.isfinite(rtol)):
        raise LoraError(f"rtol must be None (exact) or a number in [0, 1), got {rtol!r}")


def _modules(tensors: dict) -> dict:
    """``{module: {"weight": dW, "bias": db or None}}`` from ``{param name: tensor}`` (linear layers only)."""
    mods: dict = {}
    for k, v in tensors.items():
        module, _, kind = k.rpartition(".")
        if kind not in ("weight", "bias") or not module:
            raise LoraError(f"parameter {k!r} is neither a weight nor a bias; LoRA adapters edit linear layers only")
        mods.setdefault(module, {"weight": None, "bias": None})[kind] = v
    bad = [m for m, d in mods.items() if d["weight"] is None]
    if bad:
        raise LoraError(f"module(s) {bad[:2]} change only their bias; a LoRA adapter needs the weight too")
    return mods


@dataclass
class LoraExport:
    """A delta as a diffusers LoRA adapter (:func:`to_lora`): the state dict and config to write, what the
    factorisation costs, and the increment the adapter really adds (``tensors``, ``B @ A``)."""

    delta: Delta
    adapter: str
    state_dict: dict
    config: dict            # peft LoraConfig arguments (diffusers' lora_adapter_metadata, without the unet. prefix)
    ranks: dict             # {module: rank kept}
    full_ranks: dict        # {module: min(d_out, d_in)}
    errors: dict            # {module: ||dW - B A||_F / ||dW||_F}
    tensors: dict           # {param name: the increment the adapter adds}
    rank: int | None = None
    rtol: float | None = None
    leakage: float | None = None         # max over the protected prompts of ||A (BA)^T|| / ||A W^T||
    leakage_exact: float | None = None   # the same for the full-rank increment
    leakage_prompts: list = field(default_factory=list)
    output_change: float | None = None   # ||eps(theta + BA) - eps(theta + dW)|| / ||eps(theta + dW) - eps(theta)||

    @property
    def exact(self) -> bool:
        return all(self.ranks[m] == self.full_ranks[m] for m in self.ranks)

    @property
    def recon_error(self) -> float:
        return max(self.errors.values())

    def meta(self) -> dict:
        """The ``sepme_lora`` metadata written into the file."""
        d = self.delta
        info = {k: v for k, v in d.info.items() if k != "history"}
        return dict(format=FORMAT, name=d.name, adapter=self.adapter, method=d.method, base=d.base,
                    version=config.VERSION, hparams=d.hparams, info=info, protected=info.get("protected", []),
                    ranks=self.ranks, full_ranks=self.full_ranks, rank=self.rank, rtol=self.rtol, exact=self.exact,
                    recon_error=self.recon_error, leakage=self.leakage, leakage_exact=self.leakage_exact,
                    leakage_prompts=len(self.leakage_prompts), output_change=self.output_change)

    def summary(self) -> str:
        """One line on what the export costs (exact, or truncated: reconstruction error, output change, leakage)."""
        r = sorted(set(self.ranks.values()))
        ranks = f"rank {r[0]}" if len(r) == 1 else f"ranks {r[0]}-{r[-1]}"
        head = f"LoRA {self.adapter!r}: {ranks} ({'exact' if self.exact else 'truncated'}), " \
               f"reconstruction error {self.recon_error:.2g}"
        if self.output_change is not None:
            head += f", output change {self.output_change:.2g} of the edit"
        if self.leakage is not None:
            head += f", leakage {self.leakage:.2g} (full rank {self.leakage_exact:.2g})"
        elif not self.exact:
            head += " (pass model= to measure the output change and the leakage kept)"
        return head


# ------------------------------------------------------------------------------------------ measurements
def erased_prompts(delta: Delta, model=None) -> list[str]:
    """The prompts a delta erased: ``info["prompts"]``, else (older files) its concept's prompts in ``model``'s set."""
    prompts = list(delta.info.get("prompts") or [])
    if not prompts and model is not None:
        try:
            prompts = concept_set(model).prompts(delta.name)
        except (ConceptError, ValueError):
            prompts = []
    return prompts


@torch.no_grad()
def kv_leakage(model, tensors: dict, prompts) -> float:
    """``max`` over ``prompts`` and edited to_k/to_v of ``||A dW^T|| / ||A W^T||``: ``nullspace.leakage``'s certificate
    (notebook 03), computed here because this module sits below ``nullspace`` (a test checks they agree)."""
    params = dict(model.unet.named_parameters())
    worst = 0.0
    for p in prompts:
        A = model.empty_context()[0] if p == "" else model.embed_context([p])[0]
        for k, dW in tensors.items():
            if k.endswith(("to_k.weight", "to_v.weight")):
                W = params[k].detach().float()
                worst = max(worst, float((A @ dW.to(A.device, torch.float32).T).norm() / (A @ W.T).norm()))
    return worst


@torch.no_grad()
def output_change(model, exact: dict, approx: dict, prompts, n: int = 4, seed: int = 0) -> float:
    """``||eps(theta + approx) - eps(theta + exact)|| / ||eps(theta + exact) - eps(theta)||`` on fixed noisy inputs
    for ``prompts``: the share of the edit's effect on those prompts that an approximation changes."""
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, *model.latent_shape, generator=gen).to(model.device)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=gen).to(model.device)
    x = model.add_noise(z0, torch.randn(z0.shape, generator=gen).to(model.device), t)
    params = dict(model.unet.named_parameters())

    def weights(d):
        return {k: (params[k].detach().float() + v.to(params[k].device, torch.float32)).to(params[k].dtype)
                for k, v in d.items()}

    num = den = 0.0
    for p in prompts:
        c = model.embed([p]).expand(n, -1, -1)
        e0, e1, e2 = model.eps(x, t, c), model.eps(x, t, c, weights(exact)), model.eps(x, t, c, weights(approx))
        num, den = num + float((e2 - e1).norm()) ** 2, den + float((e1 - e0).norm()) ** 2
    return math.sqrt(num / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------ export / import
def to_lora(delta: Delta, rank: int | None = None, rtol: float | None = None, model=None,
            adapter: str | None = None) -> LoraExport:
    """``Delta.to_lora``: the delta as a diffusers LoRA adapter (exact by default; ``rank``/``rtol`` truncate).

    With ``model`` (the base the delta was made for) the export also records the leakage certificate at the kept rank
    on the delta's protected prompts (``info["protected"]``, else ``c_0``) and, when truncated, the output change on
    the delta's own prompts."""
    _check_truncation(rank, rtol)
    delta.check_finite()  # an SVD of NaN fails obscurely ("svd failed to converge")
    adapter = adapter_name(adapter or delta.name)
    sd, ranks, full, errors, recon = {}, {}, {}, {}, {}
    mods = _modules(delta.tensors)
    with_bias = any(d["bias"] is not None for d in mods.values())
    for module, d in mods.items():
        B, A, st = factorize(d["weight"], rank, rtol)
        sd[f"{PREFIX}.{module}.lora_A.weight"], sd[f"{PREFIX}.{module}.lora_B.weight"] = A, B
        recon[f"{module}.weight"] = B @ A
        if with_bias:  # peft's lora_bias is one switch for all layers: zero where the bias did not change
            b = d["bias"] if d["bias"] is not None else torch.zeros(B.shape[0])
            sd[f"{PREFIX}.{module}.lora_B.bias"] = b.detach().float().cpu().contiguous()
            if d["bias"] is not None:
                recon[f"{module}.bias"] = sd[f"{PREFIX}.{module}.lora_B.bias"]
        ranks[module], full[module], errors[module] = st["rank"], st["full_rank"], st["error"]
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: r for m, r in sorted(ranks.items()) if r != common}
    cfg = dict(r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),  # alpha = r: scale 1
               target_modules=sorted(ranks), lora_bias=with_bias, use_dora=False)
    out = LoraExport(delta, adapter, sd, cfg, ranks, full, errors, recon, rank, rtol)
    if model is not None:
        delta.check_base(model)
        out.leakage_prompts = list(delta.info.get("protected") or [""])
        dev = {k: v.to(model.device) for k, v in recon.items()}
        out.leakage = kv_leakage(model, dev, out.leakage_prompts)
        out.leakage_exact = kv_leakage(model, delta.tensors, out.leakage_prompts) if not out.exact else out.leakage
        if not out.exact:
            prompts = erased_prompts(delta, model)[:4]
            out.output_change = output_change(model, delta.tensors, dev, prompts) if prompts else None
    return out


def save_lora(delta: Delta, folder, rank: int | None = None, rtol: float | None = None, model=None, acc=None,
              base_model: str | None = None, verbose: bool = True, overwrite: bool = False) -> Path:
    """``Delta.save_lora``: write ``folder/pytorch_lora_weights.safetensors`` and ``folder/README.md`` (model card,
    with ``acc``, an ACC table of the run, if given); returns the folder. A truncated export prints its cost. The
    folder must be new, empty, or an earlier export of the same delta (``overwrite=True``: of any delta); it is
    written atomically (a temporary folder, then a rename)."""
    folder = check_folder(folder, delta.name, overwrite)
    exp = to_lora(delta, rank, rtol, model)
    if model is not None and not delta.info.get("prompts"):
        exp.delta.info["prompts"] = erased_prompts(delta, model)
    write(exp, folder, model_card(exp, acc, base_model or getattr(model, "name", None)), overwrite)
    if verbose and not exp.exact:
        print(exp.summary())
    return folder


def _export_name(folder: Path):
    """The delta name of an earlier export in ``folder`` (None: ``folder`` is not one)."""
    if not (folder / WEIGHTS).is_file() or set(os.listdir(folder)) - {WEIGHTS, CARD}:
        return None
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(SEPME_META) or "{}")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return meta.get("name") if meta.get("format") == FORMAT else None


def check_folder(folder, name: str, overwrite: bool = False) -> Path:
    """Refuse an empty path, a path through a file, and a non-empty folder that is not an earlier export of delta
    ``name`` (any earlier export with ``overwrite=True``): writing there would replace the user's files."""
    if not isinstance(folder, (str, os.PathLike)):
        raise BadType(f"save_lora: folder must be a path (str or Path), got {type(folder).__name__}")
    if not str(folder).strip() or Path(folder).name in ("", ".", "..") or "\x00" in str(folder):
        raise LoraError(f"save_lora: folder {str(folder)!r} is not a new folder's name; give one, e.g. "
                        f"'out/{adapter_name(name)}' (the export would otherwise land in an existing folder)")
    folder = Path(folder)
    try:
        _check_replace(folder, name, overwrite)
    except OSError as e:
        raise LoraError(f"cannot write the LoRA folder {folder}: {e.strerror or e}; give a writable folder path with "
                        "a shorter name") from None
    return folder


def _check_replace(folder: Path, name: str, overwrite: bool) -> None:
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise LoraError(f"cannot write the LoRA folder {folder}: {p} is a file; give a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        held = _export_name(folder)
        if held is None:
            raise LoraError(f"cannot write the LoRA folder {folder}: it holds other files ({sorted(os.listdir(folder))[:4]}) "
                            "that the export would replace; give a new or empty folder")
        if held != name and not overwrite:
            raise LoraError(f"cannot write the LoRA folder {folder}: it holds the export of delta {held!r}; give "
                            "another folder, or pass overwrite=True to replace it")


def write(exp: LoraExport, folder, card: str, overwrite: bool = False) -> Path:
    """Write an export into ``folder`` atomically (a temporary folder beside it, then a rename), after
    :func:`check_folder`; a failure (a full disk) names the path and leaves any earlier folder intact."""
    folder = check_folder(folder, exp.delta.name, overwrite)
    for k, t in exp.state_dict.items():
        if not torch.isfinite(t).all():
            raise LoraError(f"delta {exp.delta.name!r} holds NaN/inf values ({k}); retrain it before exporting")
    meta = {"format": "pt", DIFFUSERS_META: json.dumps({f"{PREFIX}.{k}": v for k, v in exp.config.items()},
                                                       sort_keys=True),
            SEPME_META: json.dumps(exp.meta(), default=str)}
    files = {WEIGHTS: lambda p: save_file(exp.state_dict, str(p), metadata=meta),
             CARD: lambda p: p.write_text(card)}
    return atomic_folder(folder, files, LoraError)


def read(folder, device="cpu") -> tuple[dict, dict, dict]:
    """``(tensors, sepme_meta, lora_config)`` of a LoRA folder: ``tensors[param] = scale * B @ A`` (and biases), with
    ``scale = alpha / r`` per layer from the file's config (1 when it has none, the diffusers convention)."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip() or "\x00" in str(folder):
        raise LoraError(f"from_lora: folder must name a LoRA folder, got {folder!r}")
    folder = Path(folder)
    try:
        path = folder / WEIGHTS if folder.is_dir() else folder
        exists = folder.exists()
    except OSError as e:
        raise LoraError(f"from_lora: cannot read {folder} ({e.strerror or e})") from None
    if not exists:
        raise NotFound(f"no LoRA folder at {folder}; give the folder Delta.save_lora or `sepme erase` wrote")
    if not path.exists():
        raise LoraError(f"{folder} has no {WEIGHTS}; a LoRA folder is written by Delta.save_lora or `sepme erase`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        cfg = {k.removeprefix(f"{PREFIX}."): v for k, v in json.loads(meta.get(DIFFUSERS_META) or "{}").items()}
        info = json.loads(meta.get(SEPME_META) or "{}")
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: metadata is not valid JSON ({e})") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoraError(f"{path}: tensor {bad[0]!r} holds NaN or inf values; the training run diverged or the file is "
                        "damaged. Re-export the adapter from a finite delta")
    orphans = [k for k in sd if k.endswith(".lora_B.weight") and k.replace(".lora_B.", ".lora_A.") not in sd]
    if orphans:
        raise LoraError(f"{path}: {orphans[0]} has no partner lora_A; the file is incomplete (re-export the folder)")
    foreign = [k for k in sd if not k.startswith(f"{PREFIX}.") or ".lora_" not in k]
    if foreign:
        raise LoraError(f"{path}: key {foreign[0]!r} is not a diffusers UNet LoRA key (unet.<module>.lora_A.weight); "
                        "only UNet adapters in the peft layout are read")
    tensors = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            module = k[len(PREFIX) + 1:-len(".lora_A.weight")]
            kb = f"{PREFIX}.{module}.lora_B.weight"
            if kb not in sd:
                raise LoraError(f"{path}: {k} has no partner {kb}; the file is incomplete (re-export the folder)")
            A, B = sd[k].float(), sd[kb].float()
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise LoraError(f"{path}: module {module!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                                "their ranks must match (B @ A); the file is damaged or of another layout")
            r = A.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(module, cfg.get("lora_alpha", r))
            scale = alpha / cfg.get("rank_pattern", {}).get(module, cfg.get("r", r)) if cfg else 1.0
            tensors[f"{module}.weight"] = (scale * (B.double() @ A.double())).float().to(device)
            bias = sd.get(f"{PREFIX}.{module}.lora_B.bias")
            if bias is not None and bool(bias.any()):
                tensors[f"{module}.bias"] = (scale * bias.float()).to(device)
    if not tensors:
        raise LoraError(f"{path} holds no lora_A/lora_B pairs")
    return tensors, info, cfg


def from_lora(cls, folder, device="cpu", base: str | None = None) -> Delta:
    """``Delta.from_lora``: the :class:`Delta` a LoRA folder adds (``B @ A`` per layer). A folder written by another
    tool has no base fingerprint: pass ``base=model.fingerprint()`` to accept it for ``model``."""
    tensors, meta, cfg = read(folder, device)
    if meta and meta.get("format") != FORMAT:
        raise DeltaFileError(f"{folder}: sepme_lora metadata of format {meta.get('format')!r}, expected {FORMAT!r}")
    name = meta.get("name") or Path(folder).name
    info = dict(meta.get("info") or {}, lora=dict(folder=str(folder), ranks=meta.get("ranks"),
                                                   exact=meta.get("exact"), recon_error=meta.get("recon_error"),
                                                   leakage=meta.get("leakage"), adapter=meta.get("adapter")))
    return cls(name, meta.get("method", "lora"), tensors, meta.get("base") or base or "unknown",
               meta.get("hparams") or {}, info, meta.get("version", "unknown"))


Delta.to_lora = to_lora
Delta.save_lora = save_lora
Delta.from_lora = classmethod(from_lora)
