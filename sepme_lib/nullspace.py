"""Weight decoupling (paper Eqs. 5-11): protected prompts, their null space, decoupled increments
``dW_i = beta w_i S_i^T``, the capacity check and the leakage certificate.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb``.

Shapes (torch stores a linear layer ``d_out x d_in``; the paper writes the transpose):

* ``A_i``: ``(k L, d_in)`` -- all ``L`` embedding rows of the ``k`` protected prompts stacked (Eq. 8: every other
  concept, ``c_0``, and anything the user asks to protect). One ``A_i`` serves every attn2 to_k/to_v, since all of
  them read the same text embedding.
* ``S_i``: ``(d_in, n_null)`` -- an orthonormal basis of ``null(A_i) = {x : A_i x = 0}`` from an SVD in float64
  (the conditions of Eqs. 6-7, ``c_j dW = 0``, solved for all ``dW`` at once; the paper's ``S_p`` of Eq. 9).
* ``w_i``: ``(d_out, n_null)`` per matrix, initialised to zero; ``dW_i = beta * w_i @ S_i^T`` (Eq. 10), so
  ``A_i @ dW_i^T = beta * A_i S_i w_i^T = 0``: the keys and values of every protected prompt are unchanged, and so is
  every noise prediction for them.

Soft null space (beyond the paper, notebook 08): ``null_space(A, prior=R, soft=s)`` keeps, inside the exact null
space of ``A``, the eigenvectors of the prior's second-moment matrix ``R^T R / n`` whose eigenvalue is at most
``s * lambda_max`` (AlphaEdit's and SPEED's projector, with a cut relative to the largest eigenvalue). ``A`` stays
exact (certified); the prior's rows only get small, measured changes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import BadType, BadValue, SepmeError
from .gcirs import Increment
from .model import prompt_list

# Singular values <= tol count as zero, tol = rtol * s_max. The default rtol (None) is NumPy's matrix_rank rule,
# max(rows, d_in) * eps(float64): the exact rank of the float32 embeddings stored in A. Their small singular values
# (down to ~1e-6 * s_max on the bundled model) are real, and below them the spectrum drops ~9 decades to float64 zero,
# so this cut is far from every singular value and the rank does not depend on float noise (a cut at 1e-6 * s_max
# fell between 1.03e-6 and 7.0e-7: the rank could flip with the thread count).
NULL_RTOL = None


class CapacityError(SepmeError, ValueError):
    """The null space left for a concept is too small to train a meaningful increment."""


class NullSpace(NamedTuple):
    """Result of :func:`null_space`.

    ``basis`` ``S`` ``(d_in, n_null)`` (orthonormal columns, float64); ``singular_values`` of ``A``; ``rank``;
    ``tol`` = ``rtol * s_max`` (singular values at or below it count as zero); ``residual`` = ``||A S||_2``, measured,
    which is at most ``tol`` by construction (it equals the largest discarded singular value). With a prior
    (soft null space): ``exact_dim``, the cut ``soft`` and ``prior_energy``."""

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tol: float
    residual: float
    exact_dim: int | None = None  # dimension of the exact null space of A (before the soft cut)
    soft: float = 0.0             # the relative eigenvalue cut of the prior (0: no prior, or its exact null space)
    prior_energy: float = 0.0     # ||R S||_F^2 / ||R||_F^2: share of the prior's energy the basis still reads

    @property
    def dim(self) -> int:
        return self.basis.shape[1]


def stack_rows(model, prompts) -> torch.Tensor:
    """``A``: all ``L`` rows of every prompt's embedding stacked, ``(k*L, d_in)`` (Eq. 8). ``""`` is ``c_0``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to stack: A needs at least c_0 ('')")
    return torch.cat([model.empty_context()[0] if p == "" else model.embed_context([p])[0] for p in prompts])


def null_space(A: torch.Tensor, rtol: float | None = NULL_RTOL, prior: torch.Tensor | None = None,
               soft: float = 0.0) -> NullSpace:
    """Orthonormal basis of ``{x : A x = 0}`` by SVD in float64 (the solutions ``S_p`` of Eqs. 8-9), with its measured
    residual.

    ``A = U diag(s) V^T``; the right singular vectors whose singular value is ``<= rtol * s_max`` span the
    (numerical) null space; ``rtol=None``: ``max(rows, d_in) * eps(float64)`` (see ``NULL_RTOL``). Returns a
    :class:`NullSpace`; ``residual <= tol`` holds by construction and is checked.

    ``prior`` (rows ``R``, ``(n, d_in)``) and ``soft`` (beyond the paper, notebook 08): inside that null space keep
    only the eigenvectors of ``S^T (R^T R / n) S`` with eigenvalue ``<= max(soft, max(n, d_in) eps) * lambda_max(R^T
    R / n)`` -- a soft null space of the prior (``soft = 0``: its exact null space too, NumPy's rank rule). The
    certificate for ``A`` is unchanged; the prior's rows keep ``prior_energy`` of their energy in the basis.
    """
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.numel() == 0:
        raise BadValue(f"null_space: A must be a non-empty 2-D tensor (rows x d_in), got "
                       f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if not torch.isfinite(A).all():
        raise BadValue("null_space: A contains NaN or inf values; build it from finite embeddings (stack_rows)")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float))):
        raise BadValue(f"null_space: rtol must be None or a number in [0, 1), got {rtol!r}")
    if prior is not None and (not isinstance(prior, torch.Tensor) or prior.dim() != 2 or prior.shape[1] != A.shape[1]
                              or len(prior) == 0):
        raise BadValue(f"null_space: prior must be a (n, {A.shape[1]}) tensor (rows of the same width d_in as A), got "
                       f"{tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__}")
    A64 = A.detach().to("cpu", torch.float64)
    if rtol is None:
        rtol = max(A64.shape) * torch.finfo(torch.float64).eps
    if not 0 <= rtol < 1:
        raise BadValue(f"null_space: rtol must be in [0, 1), got {rtol}")
    _, s, vh = torch.linalg.svd(A64, full_matrices=True)
    tol = float(rtol * s.max()) if s.numel() else 0.0
    rank = int((s > tol).sum())
    S = vh[rank:].T.contiguous()
    residual = float(torch.linalg.matrix_norm(A64 @ S, ord=2)) if S.shape[1] else 0.0
    # ||A S||_2 equals the largest discarded singular value (<= tol); allow float64 rounding of the product
    if residual > tol + 1e-12 * float(s.max()):
        raise ArithmeticError(f"null space check failed: ||A S||_2 = {residual:.3g} > tol {tol:.3g}")
    if prior is None:
        return NullSpace(S, s, rank, tol, residual)
    if not isinstance(soft, (int, float)) or isinstance(soft, bool) or not 0 <= soft < 1:
        raise BadValue(f"null_space: soft (the relative eigenvalue cut of the prior) must be a number in [0, 1), got {soft!r}")
    R = prior.detach().to("cpu", torch.float64).reshape(-1, A64.shape[1])
    if not torch.isfinite(R).all():
        raise BadValue("null_space: the prior rows contain NaN or inf values")
    C = R.T @ R / max(1, len(R))
    ev, V = torch.linalg.eigh(S.T @ C @ S)
    floor = max(R.shape) * torch.finfo(torch.float64).eps  # NumPy's rank rule for the eigenvalues of C: numerical 0
    cut = max(float(soft), floor) * float(torch.linalg.eigvalsh(C).max())
    Ss = (S @ V[:, ev <= cut]).contiguous()
    energy = float((R @ Ss).pow(2).sum() / R.pow(2).sum().clamp_min(1e-300))
    return NullSpace(Ss, s, rank, tol, residual, exact_dim=S.shape[1], soft=float(soft), prior_energy=energy)


def check_capacity(ns: NullSpace, n_prompts: int, name: str, minimum: int) -> None:
    """Refuse, naming the numbers, a null space smaller than ``minimum`` dimensions (see the README's capacity
    estimate ``d_in - (k (L - 1) + 1)`` for ``k`` stacked prompts)."""
    d_in = ns.basis.shape[0]
    if ns.dim < minimum:
        raise CapacityError(
            f"the null space left for concept {name!r} has dimension {ns.dim} (= d_in {d_in} - rank {ns.rank} of "
            f"{n_prompts} protected prompts, each adding up to L - 1 rows: capacity(d_in, L, k)), below the minimum "
            f"{minimum}. Protect fewer rows: fewer prompts per concept (make_concepts(..., n_prompts=1)) or fewer "
            "protected prompts; or use concept-level protection (erase(..., **methods.concept_level(model)): the other "
            "concepts in a soft null space, notebook 08); or erase in several iterative stages (mode='iterative')"
            + (f", or raise the soft cut (soft={ns.soft:g}; {ns.exact_dim} dimensions before it)"
               if ns.exact_dim is not None else "") + ".")


def decoupled_increment(model, name: str, protect_prompts, beta: float, min_null_dim: int, lr: float,
                        tau: float, prior_prompts=None, soft: float = 0.0) -> Increment:
    """``dW = beta * w S^T`` on every attn2 to_k/to_v, ``S`` spanning ``null(A)`` of the protected prompts, ``w = 0``
    (Eq. 10). Raises :class:`CapacityError` before anything trains when the null space is too small.

    ``prior_prompts`` and ``soft``: the soft null space of :func:`null_space` (concept-level protection, notebook
    08); the protected prompts stay exact, the prior's are recorded in ``info["prior"]``."""
    protect_prompts = list(dict.fromkeys(protect_prompts))
    prior_prompts = None if prior_prompts is None else list(dict.fromkeys(prior_prompts))
    prior = None if prior_prompts is None else stack_rows(model, prior_prompts)
    ns = null_space(stack_rows(model, protect_prompts), prior=prior, soft=soft)
    check_capacity(ns, len(protect_prompts), name, min_null_dim)
    S = ns.basis.to(model.device, torch.float32)
    params = {k: torch.zeros(p.shape[0], S.shape[1], device=model.device, requires_grad=True)
              for k, p in model.params(model.kv_weight_names()).items()}
    info = dict(null_dim=ns.dim, rank=ns.rank, d_in=S.shape[0], null_residual=ns.residual, null_tol=ns.tol,
                protected=protect_prompts)
    if prior_prompts is not None:
        info.update(prior=prior_prompts, soft=ns.soft, exact_null_dim=ns.exact_dim, prior_energy=ns.prior_energy)
    return Increment(name, params, lr=lr, tau=tau, basis=S, beta=beta, info=info)


# ------------------------------------------------------------------------------------------ certificate
def _tensors(deltas_or_tensors) -> dict:
    """A dict of tensors from a Delta, a list of Deltas (their plain sum) or a dict itself."""
    x = deltas_or_tensors
    if isinstance(x, dict):
        out = x
    else:
        if isinstance(x, (str, bytes)) or not (hasattr(x, "tensors") or hasattr(x, "__iter__")):
            raise BadType(f"leakage: deltas must be a Delta, a list of Deltas or a dict of tensors, got "
                          f"{type(x).__name__}")
        items = [x] if hasattr(x, "tensors") else list(x)
        if not items:
            raise BadValue("leakage needs at least one delta (or a dict of tensors)")
        bad = [d for d in items if not isinstance(getattr(d, "tensors", None), dict)]
        if bad:
            raise BadType(f"leakage: deltas must be Delta objects, got {type(bad[0]).__name__}")
        out = {}
        for d in items:
            for k, v in d.tensors.items():
                out[k] = out[k] + v if k in out else v
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise BadType(f"leakage: the increment of {k!r} must be a tensor, got {type(v).__name__}")
        if not torch.isfinite(v).all():
            raise BadValue(f"leakage: the increment of {k!r} holds NaN or inf values, so no certificate can be given; "
                           "retrain the delta (a finite one is needed)")
    return out


@torch.no_grad()
def leakage(model, deltas_or_tensors, prompts) -> dict:
    """Certificate of separability: for each prompt, ``max_l ||A dW_l^T|| / ||A W_l^T||`` over the edited to_k/to_v
    matrices, ``A`` the prompt's ``L`` embedding rows (notebook 03): the relative change of its keys and values.

    ``deltas_or_tensors``: a :class:`~sepme_lib.deltas.Delta`, a list of them (summed with scale 1), or a dict of
    tensors. Exact (float precision) for prompts stacked into ``A_i`` when training; for any other prompt it is a
    measurement. Only to_k/to_v changes are counted: a G-CiRs increment also edits to_q and to_out, which act on
    every prompt, so for it this number understates the change."""
    tensors = _tensors(deltas_or_tensors)
    prompts = prompt_list(prompts)
    if not prompts:
        raise BadValue("leakage needs at least one prompt ('' is c_0)")
    params = dict(model.unet.named_parameters())
    kv = {k: v for k, v in tensors.items() if k.endswith(("to_k.weight", "to_v.weight"))}
    if not kv:
        raise BadValue(f"leakage: the increment edits no attn2 to_k/to_v weight (it edits {sorted(tensors)[:2]}...); "
                       "the certificate measures key/value changes only")
    for k, v in kv.items():
        if k not in params or tuple(v.shape) != tuple(params[k].shape):
            raise BadValue(f"leakage: {k!r} of shape {tuple(v.shape)} is not a parameter of this model's UNet; "
                           "measure a delta on the model it was made for")
    out = {}
    for p in prompts:
        A = model.empty_context()[0] if p == "" else model.embed_context([p])[0]
        worst = 0.0
        for k, dW in kv.items():
            W = params[k].detach().float()
            num = (A @ dW.to(A.device, torch.float32).T).norm()
            den = (A @ W.T).norm()
            worst = max(worst, float(num / den))
        out[p] = worst
    return out


def capacity_table(model, prompt_sets) -> list[dict]:
    """Null-space dimension for growing sets of protected prompts (notebook 03's capacity plot)."""
    rows = []
    for prompts in prompt_sets:
        A = stack_rows(model, prompts)
        ns = null_space(A)
        rows.append(dict(prompts=len(prompts), rows=A.shape[0], rank=ns.rank, null_dim=ns.dim))
    return rows


# ------------------------------------------------------------------------------------------------- capacity
# (d_in of attn2 to_k/to_v, tokenizer length L) of the model families the course talks about
FAMILY_DIMS = {"SD 1.4": (768, 77), "SDXL": (2048, 77)}


def capacity(d_in: int, tokens: int, prompts: int, min_null_dim: int = 16) -> dict:
    """The null space left by ``prompts`` protected prompts (``c_0`` counted) with every row protected:
    ``d_in - (k (L - 1) + 1)`` -- the BOS row is the same for every prompt (the text encoder is causal), each prompt adds
    its other ``L - 1`` rows. A lower bound of the measured dimension (equal where the rows are independent, as for
    CLIP's; prompts sharing a longer prefix share those rows too and leave more). Also ``max_prompts``, the largest ``k`` that still leaves ``min_null_dim``, and ``fits``."""
    for name, v, lo in (("d_in", d_in, 1), ("tokens", tokens, 2), ("prompts", prompts, 0), ("min_null_dim", min_null_dim, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BadValue(f"capacity: {name} must be a whole number >= {lo}, got {v!r}")
    rows = prompts * (tokens - 1) + 1 if prompts else 0
    null = max(0, d_in - rows)
    return dict(d_in=d_in, tokens=tokens, prompts=prompts, rows=rows, null_dim=null, min_null_dim=min_null_dim,
                fits=null >= min_null_dim, max_prompts=max(0, (d_in - 1 - min_null_dim) // (tokens - 1)))


def max_concepts(d_in: int, tokens: int, prompts_per_concept: int, min_null_dim: int = 16) -> int:
    """The most concepts SepME's separate mode can erase when each concept has ``prompts_per_concept`` prompts: each
    increment protects ``c_0`` and every other concept's prompts, ``k = 1 + p (n - 1)``."""
    kmax = capacity(d_in, tokens, 0, min_null_dim)["max_prompts"]
    return 0 if kmax < 1 else 1 + (kmax - 1) // prompts_per_concept


def capacity_rows(families=None, min_null_dim: int = 16, prompts_per_concept: int = 4, concepts: int = 3) -> list[dict]:
    """Notebook 03's capacity table: per family, the largest number of protected prompts and of concepts (one prompt
    each, and ``prompts_per_concept`` each), and the null dimension of ``concepts`` concepts and of one more."""
    out = []
    for fam, (d_in, L) in (families or FAMILY_DIMS).items():
        k = 1 + prompts_per_concept * (concepts - 1)
        out.append(dict(family=fam, d_in=d_in, tokens=L, min_null_dim=min_null_dim,
                        max_prompts=capacity(d_in, L, 1, min_null_dim)["max_prompts"],
                        max_concepts_1_prompt=max_concepts(d_in, L, 1, min_null_dim),
                        prompts_per_concept=prompts_per_concept,
                        max_concepts=max_concepts(d_in, L, prompts_per_concept, min_null_dim),
                        concepts=concepts, null_dim=capacity(d_in, L, k)["null_dim"],
                        null_dim_next=capacity(d_in, L, k + prompts_per_concept)["null_dim"]))
    return out


def capacity_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    p, n = r0["prompts_per_concept"], r0["concepts"]
    head = ["family", "d_in", "L", "max protected prompts", "max concepts (1 prompt each)",
            f"max concepts ({p} prompts each)", f"null dim, {n} concepts x {p}", f"null dim, {n + 1} concepts x {p}"]
    lines = [f"Capacity with every row protected, null dim = d_in - (k(L-1)+1), minimum {r0['min_null_dim']} "
             "(SepME's separate mode: each increment protects c_0 and the other concepts' prompts)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['family']} | {r['d_in']} | {r['tokens']} | {r['max_prompts']} | "
                     f"{r['max_concepts_1_prompt']} | {r['max_concepts']} | {r['null_dim']} | {r['null_dim_next']} |")
    return "\n".join(lines)
