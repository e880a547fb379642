"""The closed-form relatives on one solver: UCE, RECE and MACE's closed-form refinement, plus RECE's
derived embedding (also the red-team probe of ``evaluate``).

Introduced in ``notebooks/06_relatives_closed_form_and_baselines.ipynb``. Every method edits every attn2 to_k/to_v
with :func:`closed_form_edit` (float64, one factorisation for all matrices, since they read the same keys) and
returns the same :class:`~sepme_lib.deltas.Delta` SepME returns. Settings come resolved from ``methods.DEFAULTS``.

Which token rows are keys is a choice (:func:`key_rows`); ``official=True`` reproduces the authors' released code:

* UCE (``train_erase.py``'s ``edit_model``, 2023): erase rows from each prompt's last word to the end, aligned with
  the guide's rows from *its* last word (an empty guide starts at its BOS row 0); preserve ``''`` and the preserve
  prompts with all ``L`` rows; ``preserve_scale = max(0.1, 1/len(retain))`` unless given; targets from the original
  weights.
* RECE (``train_artists.py``): start from official UCE, then each epoch derive ``c'`` (Eq. 8) from the current
  weights and re-solve UCE anchored at the current weights, all ``L`` rows of ``c'`` aligned with all rows of the
  guide, targets and preserve values from the current weights; the last epoch is returned.

``official=True`` is the default of both model families (``methods.DEFAULTS``). ``official=False`` is a variant kept
for comparison (notebook 06): preserve rows are the ``keys`` rows too, ``''`` is not added, and RECE's re-solves keep
the original weights' guide values as targets.
"""
from __future__ import annotations

import math
import time
import warnings

import torch

from . import config
from .attacks import derive_embedding, kv_weights  # noqa: F401 - closed_form.derive_embedding (notebook 06)
from .concepts import anchors_for, check_clashes, general_prompts, preserve_prompts, prompt_list
from .config import SepmeError
from .deltas import Delta

COND_WARN = 1e9  # closed_form_edit warns above this condition number of (lam I + sum k k^T): in float64 the
#                  solution then keeps fewer than ~7 correct digits, less than the float32 weights it is written to
KEY_MODES = ("all", "words", "eos", "tail")


class ClosedFormError(SepmeError, ValueError):
    """Bad input to a closed-form method (the message names the problem and the fix)."""


# ------------------------------------------------------------------------------------ which rows are keys
def key_rows(model, prompt: str, keys: str, guide: str | None = None):
    """Rows of ``prompt``'s ``L`` embedding rows used as keys, and the aligned rows of ``guide`` (its target).

    * ``"all"``: every row ``0..L-1``, position-aligned (what SepME's null spaces protect);
    * ``"words"``: the word rows ``1..n``, position-aligned (the guide's rows at the same positions);
    * ``"eos"``: the EOS and padding rows, aligned from each prompt's own EOS;
    * ``"tail"``: the last word and everything after it, aligned from each prompt's last word (UCE's ``edit_model``:
      rows ``n..`` of the prompt with ``n`` its word count; an empty guide has no word, so its rows start at BOS, 0).
    """
    if keys not in KEY_MODES:
        raise ClosedFormError(f"unknown keys {keys!r}; use one of {KEY_MODES}")
    L = model.max_length
    n = model.word_count(prompt)
    ng = model.word_count(guide) if guide is not None else n
    if keys == "all":
        s, sg, count = 0, 0, L
    elif keys == "words":
        s, sg, count = 1, 1, n
    elif keys == "eos":
        s, sg = n + 1, ng + 1
        count = min(L - s, L - sg)
    else:
        s, sg = n, ng
        count = min(L - s, L - sg)
    return list(range(s, s + count)), list(range(sg, sg + count))


# -------------------------------------------------------------------------------------- closed-form solve
def closed_form_edit(W, erase_keys, erase_targets, preserve_keys=None, lam: float = 0.5, erase_scale: float = 1.0,
                     preserve_scale=1.0, preserve_targets=None, return_delta: bool = False):
    """The one closed-form solve shared by UCE, RECE and MACE (UCE's closed form = RECE Eq. 3 = MACE Eqs. 16/19).

    Minimises, per matrix, in float64::

        e * sum_i ||W' k_i - v_i||^2 + sum_j p_j ||W' k_j - u_j||^2 + lam * ||W' - W||_F^2

    whose solution is ``W' = (lam W + e V^T K_e + U^T diag(p) K_p) (lam I + e K_e^T K_e + K_p^T diag(p) K_p)^-1``.

    ``W``: a ``(d_out, d_in)`` tensor, or a dict of them (all share the keys, so one factorisation serves all).
    ``erase_keys`` ``(n, d_in)``; ``erase_targets`` ``(n, d_out)`` (a dict like ``W`` if ``W`` is a dict): the
    outputs the erase keys should produce (UCE: ``W_old c_g``). ``preserve_keys`` ``(m, d_in)`` with targets
    ``preserve_targets`` (default ``W k_j``: keep what they give now); ``preserve_scale`` a number or ``(m,)``
    per-row weights (MACE's lambda_1 / lambda_3). Returns ``(W_new or dW, report)`` with the relative residuals
    ``||K W'^T - V|| / ||V||`` on erase and preserve keys (and the erase residual before the edit), the condition
    number of the system and the solver. Warns when the condition number exceeds :data:`COND_WARN` and then
    solves by least squares (the minimum-norm solution) instead of a Cholesky factorisation.
    """
    single = not isinstance(W, dict)
    Ws = {"W": W} if single else dict(W)
    Vs = {"W": erase_targets} if single else dict(erase_targets)
    if set(Vs) != set(Ws):
        raise ClosedFormError("erase_targets must have one entry per matrix of W (same names)")
    first = next(iter(Ws.values()))
    d_in = first.shape[1]
    Ke = torch.as_tensor(erase_keys).detach().to("cpu", torch.float64)
    Ke = Ke.reshape(-1, Ke.shape[-1])
    if Ke.shape[1] != d_in:
        raise ClosedFormError(f"erase keys have width {Ke.shape[1]} but W reads {d_in}-dimensional inputs")
    Kp = (torch.zeros(0, d_in, dtype=torch.float64) if preserve_keys is None
          else torch.as_tensor(preserve_keys).detach().to("cpu", torch.float64).reshape(-1, d_in))
    p = torch.as_tensor(preserve_scale, dtype=torch.float64).expand(len(Kp)) if len(Kp) else Kp.new_zeros(0)
    if lam < 0 or erase_scale < 0 or (p < 0).any():
        raise ClosedFormError("lam, erase_scale and preserve_scale must be >= 0")
    # M = lam I + e K_e^T K_e + K_p^T diag(p) K_p   (d_in x d_in, symmetric positive semi-definite)
    M = lam * torch.eye(d_in, dtype=torch.float64) + erase_scale * Ke.T @ Ke + (Kp * p[:, None]).T @ Kp
    ev = torch.linalg.eigvalsh(M)
    cond = float(ev.max() / ev.min()) if ev.min() > 0 else math.inf
    solver = "cholesky"
    if cond > COND_WARN:
        warnings.warn(f"closed_form_edit: the system (lam I + sum k k^T) is ill-conditioned (condition number "
                      f"{cond:.3g} > {COND_WARN:.0e}, lam={lam:g}, {len(Ke)} erase + {len(Kp)} preserve keys in "
                      f"{d_in} dimensions); solving by least squares (minimum norm). Raise lam or add preserve "
                      "prompts to make it well-posed.", RuntimeWarning, stacklevel=2)
        solver = "lstsq"
    else:
        chol = torch.linalg.cholesky(M)
    # every matrix reads the same keys, so stack them: W (sum d_out, d_in), V (n, sum d_out), U (m, sum d_out)
    names = list(Ws)
    sizes = [Ws[k].shape[0] for k in names]
    W64 = torch.cat([Ws[k].detach().to("cpu", torch.float64) for k in names])
    V = torch.cat([torch.as_tensor(Vs[k]).detach().to("cpu", torch.float64).reshape(len(Ke), -1) for k in names], 1)
    if preserve_targets is None:
        U = Kp @ W64.T  # keep what the preserve keys give now
    else:
        pt = {"W": preserve_targets} if single else preserve_targets
        U = torch.cat([torch.as_tensor(pt[k]).detach().to("cpu", torch.float64) for k in names], 1)
    # B = lam W + e V^T K_e + U^T diag(p) K_p   (d_out x d_in);   W' = B M^-1  <=>  W'^T = M^-1 B^T
    B = lam * W64 + erase_scale * V.T @ Ke + (U * p[:, None]).T @ Kp
    Wn = (torch.cholesky_solve(B.T, chol) if solver == "cholesky" else torch.linalg.lstsq(M, B.T).solution).T
    ER, ER0 = Ke @ Wn.T - V, Ke @ W64.T - V
    PR = Kp @ Wn.T - U
    rep = dict(erase=[], erase_before=[], preserve=[])
    out, o = {}, 0
    for k, n in zip(names, sizes):
        sl = slice(o, o + n)
        o += n
        vn = V[:, sl].norm().clamp_min(1e-30)
        rep["erase"].append(float(ER[:, sl].norm() / vn))  # ||K_e W'^T - V|| / ||V||
        rep["erase_before"].append(float(ER0[:, sl].norm() / vn))
        if len(Kp):
            rep["preserve"].append(float(PR[:, sl].norm() / U[:, sl].norm().clamp_min(1e-30)))
        res = Wn[sl] - W64[sl] if return_delta else Wn[sl]
        out[k] = res.to(Ws[k].device, Ws[k].dtype)
    report = dict(cond=cond, solver=solver, n_erase=len(Ke), n_preserve=len(Kp),
                  erase_residual=max(rep["erase"]), erase_residual_before=max(rep["erase_before"]),
                  preserve_residual=max(rep["preserve"], default=0.0))
    return (out["W"] if single else out), report


# ----------------------------------------------------------------------------------------- closed forms
def _pair_rows(model, prompts, guides, keys):
    """Stack the key rows of ``prompts`` and the aligned rows of ``guides``: ``(K_e, C_g)``, both ``(n, d_in)``."""
    E, G = model.embed_context(prompts), model.embed_context(guides)
    ke, kg = [], []
    for i, (p, g) in enumerate(zip(prompts, guides)):
        re, rg = key_rows(model, p, keys, g)
        ke.append(E[i, re])
        kg.append(G[i, rg])
    return torch.cat(ke), torch.cat(kg)


def _rows(model, prompts, keys):
    if not prompts:
        return None
    E = model.embed_context(prompts)
    return torch.cat([E[i, key_rows(model, p, keys)[0]] for i, p in enumerate(prompts)])


def _name(concepts) -> str:
    return "+".join(c.name for c in concepts)


def _values(K: torch.Tensor, W: dict) -> dict:
    """``{name: K W^T}`` in float64: the outputs of every matrix for the rows of ``K``."""
    return {k: K.double().cpu() @ w.double().T.cpu() for k, w in W.items()}


def _default_preserve(model, concepts) -> list:
    """The concept set's preserve prompts for ``concepts``; a clear hint for concepts outside the set."""
    try:
        return preserve_prompts(model, [c.name for c in concepts])
    except ValueError as e:
        raise ClosedFormError(f"no default preserve set ({e}): a custom Concept needs the prompts to keep, e.g. "
                              "preserve=['a red star', 'a painting'] (or preserve=[] to keep only c_0)") from None


def prompt_sets(model, concepts, anchor, preserve):
    """UCE/RECE's three prompt sets: erase (every prompt of every concept), guide (their anchors), preserve
    (default: the other concepts of the model's concept set). A prompt both erased and preserved is refused."""
    prompts = [p for c in concepts for p in c.prompts]
    guides = [g for c in concepts for g in anchors_for(model, c, anchor)]
    if preserve is None:
        keep = _default_preserve(model, concepts)
    else:
        keep = prompt_list(preserve, "preserve")
    check_clashes(model, concepts, keep, "preserve=", "preserved")
    return prompts, guides, keep


def _official_retain(keep, preserve_scale):
    """UCE's retain set and scale: ``''`` plus the preserve prompts, ``max(0.1, 1/len(retain))`` unless given."""
    retain = [""] + [p for p in keep if p != ""]
    return retain, (max(0.1, 1 / len(retain)) if preserve_scale is None else preserve_scale)


def uce(model, concepts, s: dict, anchor=None, preserve=None) -> Delta:
    """UCE (closed form), on every attn2 to_k/to_v, notebook 06::

        W* = (lam W + e sum W c_g c_e^T + p sum W c_p c_p^T) (lam I + e sum c_e c_e^T + p sum c_p c_p^T)^-1

    Erase keys ``c_e``: the key rows (``s["keys"]``) of every prompt of every concept; guides ``c_g``: the aligned rows
    of their anchors; preserve ``c_p``: ``preserve``'s rows. ``official=True``: the authors' ``edit_model`` (module
    docstring)."""
    t0 = time.time()
    prompts, guides, keep = prompt_sets(model, concepts, anchor, preserve)
    W0 = kv_weights(model)
    if s["official"]:
        keep, pscale = _official_retain(keep, s["preserve_scale"])
        Ke, Cg = _pair_rows(model, prompts, guides, "tail")
        Kp = _rows(model, keep, "all")
    else:
        pscale = 1.0 if s["preserve_scale"] is None else s["preserve_scale"]
        Ke, Cg = _pair_rows(model, prompts, guides, s["keys"])
        Kp = _rows(model, keep, s["keys"])
    dW, rep = closed_form_edit(W0, Ke, _values(Cg, W0), Kp, s["lam"], s["erase_scale"], pscale, return_delta=True)
    info = dict(rep, seconds=round(time.time() - t0, 3), concepts=[c.name for c in concepts], prompts=prompts,
                anchors=guides, protected=keep, preserve_scale=pscale)
    return Delta(_name(concepts), "uce", {k: v.float() for k, v in dW.items()}, model.fingerprint(), dict(s), info)


def recoverability(model, W: dict, W0: dict, prompts, guides, keys, reg, E, G) -> tuple[float, torch.Tensor]:
    """How much of the concept the weights ``W`` can still express: derive ``c'`` (Eq. 8) and measure the share of
    the concept's key/value displacement from its anchor that ``c'`` reproduces,
    ``rho = <W c' - W0 c_g, W0 c - W0 c_g> / ||W0 c - W0 c_g||^2`` over every matrix and key row (1: fully
    recoverable, 0: ``c'`` looks like the anchor). ``E``, ``G``: embeddings of ``prompts`` and ``guides``."""
    Cp = derive_embedding(W, W0, E, reg)
    Ws = torch.cat([W[k].detach().double().cpu() for k in W0])
    W0s = torch.cat([w.detach().double().cpu() for w in W0.values()])
    num = den = 0.0
    for i, (p, g) in enumerate(zip(prompts, guides)):
        re, rg = key_rows(model, p, keys, g)
        anchor = G[i, rg].double().cpu() @ W0s.T
        a = Cp[i, re].double().cpu() @ Ws.T - anchor  # W c' - W0 c_g
        b = E[i, re].double().cpu() @ W0s.T - anchor  # W0 c - W0 c_g
        num += float((a * b).sum())
        den += float((b * b).sum())
    return num / max(den, 1e-30), Cp


def rece(model, concepts, s: dict, anchor=None, preserve=None) -> Delta:
    """RECE (its Alg. 1; Eqs. 3 and 8), notebook 06: UCE, then ``s["epochs"]`` times derive
    ``c' = (reg I + sum W'^T W')^-1 (sum W'^T W) c`` for each concept prompt from the current weights ``W'`` and erase
    ``c'`` with the same closed-form solve, anchored at the current weights (the ridge ``lam``). The last epoch is
    returned, as the authors' script for artistic styles saves every epoch; ``info["epochs"]`` records, before each
    epoch, the recoverability ``rho`` of the weights (:func:`recoverability`) and the solve's residuals.

    Default targets: the derived rows ``c'`` -> the anchors' *original* values ``W_0 c_g``, preserve rows ->
    ``W_0 c_p`` (the edit never drifts from what the original model gave the anchors). ``official=True``: the authors'
    code (module docstring)."""
    t0 = time.time()
    prompts, guides, keep = prompt_sets(model, concepts, anchor, preserve)
    W0 = kv_weights(model)
    E, G = model.embed_context(prompts), model.embed_context(guides)
    if s["official"]:
        keep, pscale = _official_retain(keep, s["preserve_scale"])
        uce_s = dict(s, official=True, lam=0.5, erase_scale=1.0, preserve_scale=None)  # UCE's own defaults
        W = {k: W0[k].double().cpu() + v.double() for k, v in uce(model, concepts, uce_s, anchor, preserve).tensors.items()}
        Kp, rows = _rows(model, keep, "all"), "all"
    else:
        pscale = 1.0 if s["preserve_scale"] is None else s["preserve_scale"]
        rows = s["keys"]
        Ke, Cg = _pair_rows(model, prompts, guides, rows)
        Kp = _rows(model, keep, rows)
        targets, ptargets = _values(Cg, W0), (_values(Kp, W0) if Kp is not None else None)
        W, _ = closed_form_edit(W0, Ke, targets, Kp, s["lam"], 1.0, pscale, ptargets)  # epoch 0 = UCE
    history = []
    for epoch in range(s["epochs"] + 1):
        rho, Cp = recoverability(model, W, W0, prompts, guides, rows, s["reg"], E, G)
        history.append(dict(epoch=epoch, rho=rho))
        if epoch == s["epochs"]:
            break
        if s["official"]:  # all L rows of c' -> all L rows of the guide, values and preserve from the current W
            Kd, Cg = Cp.reshape(-1, Cp.shape[-1]), G.reshape(-1, G.shape[-1])
            W, rep = closed_form_edit(W, Kd, _values(Cg, W), Kp, s["lam"], 1.0, pscale, None)
        else:  # c''s key rows -> the anchors' original values; the ridge pulls to the current W
            Kd = torch.cat([Cp[i, key_rows(model, p, rows, g)[0]] for i, (p, g) in enumerate(zip(prompts, guides))])
            W, rep = closed_form_edit(W, Kd, targets, Kp, s["lam"], 1.0, pscale, ptargets)
        history[-1].update(erase_residual=rep["erase_residual"], preserve_residual=rep["preserve_residual"])
    dW = {k: (W[k].double().cpu() - W0[k].double().cpu()).float().to(W0[k].device) for k in W0}
    info = dict(seconds=round(time.time() - t0, 3), epoch=s["epochs"], epochs=history, concepts=[c.name for c in concepts],
                prompts=prompts, anchors=guides, protected=keep, preserve_scale=pscale)
    return Delta(_name(concepts), "rece", dW, model.fingerprint(), dict(s), info)


def coexisting_rows(model, prompt: str, mapped: str, phrase_rows: str = "keep"):
    """MACE's co-existing words: the rows of ``prompt`` outside the concept phrase and the aligned rows of the
    ``mapped`` prompt (the phrase replaced by the mapping concept). The phrase is where the two token sequences
    differ (longest common prefix and suffix); prefix words align by position, the suffix words, EOS and padding
    align from the end of each phrase. ``phrase_rows="map"`` also maps the phrase rows onto the mapped prompt's rows
    at the same offsets (MACE leaves them to its LoRA stage: ``"keep"``)."""
    a_ids, b_ids = model.token_ids(prompt), model.token_ids(mapped)
    L = model.max_length
    pre = 0
    while pre < min(len(a_ids), len(b_ids)) and a_ids[pre] == b_ids[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a_ids), len(b_ids)) - pre and a_ids[-1 - suf] == b_ids[-1 - suf]:
        suf += 1
    ea, eb = len(a_ids) - suf, len(b_ids) - suf  # first suffix row of each
    count = min(L - ea, L - eb)
    ra = list(range(1, pre)) + list(range(ea, ea + count))
    rb = list(range(1, pre)) + list(range(eb, eb + count))
    if phrase_rows == "map":
        for j in range(ea - pre):
            ra.append(pre + j)
            rb.append(min(pre + j, L - 1))
    elif phrase_rows != "keep":
        raise ClosedFormError(f"phrase_rows must be 'keep' or 'map', got {phrase_rows!r}")
    return ra, rb


def mace(model, concepts, s: dict, mapped=None, preserve=None, general=None) -> Delta:
    """MACE's closed-form cross-attention refinement (its appendix Eqs. 12-16 and 19), notebook 06.

    For every prompt of a concept, the co-existing words' rows ``e^f`` (:func:`coexisting_rows`) are mapped onto the
    same words' rows ``e^g`` of the mapped prompt (``mapped``, default: the concept set's anchor), i.e. targets
    ``W e^g``; the prior is preserved through two prompt sets with weights ``lam_general`` (``general``, default
    ``concepts.general_prompts``: random world captions without the concepts, the stand-in for MS-COCO) and
    ``lam_domain`` (``preserve``: the other concepts' prompts). ``lam`` is a small ridge ``||W' - W||^2`` that MACE's
    Eq. (16) lacks; it keeps the solve well-posed.
    """
    t0 = time.time()
    prompts = [p for c in concepts for p in c.prompts]
    maps = [g for c in concepts for g in anchors_for(model, c, mapped)]
    E, G = model.embed_context(prompts), model.embed_context(maps)
    kf, kg = [], []
    for i, (p, q) in enumerate(zip(prompts, maps)):
        ra, rb = coexisting_rows(model, p, q, s["phrase_rows"])
        kf.append(E[i, ra])
        kg.append(G[i, rb])
    Kf, Kg = torch.cat(kf), torch.cat(kg)
    names = [c.name for c in concepts]
    if general is None:  # n_general prompts x L rows x d_in in float64, a few copies
        d_in = next(iter(kv_weights(model).values())).shape[1]
        config.check_memory(f"mace: n_general={s['n_general']} general prompts", 24.0 * s["n_general"] *
                            model.max_length * d_in, "lower n_general (64 by default), or pass general= prompts")
    general = general_prompts(model, names, s["n_general"]) if general is None else prompt_list(general, "general")
    domain = _default_preserve(model, concepts) if preserve is None else prompt_list(preserve, "preserve")
    check_clashes(model, concepts, domain, "preserve=", "preserved")
    check_clashes(model, concepts, general, "general=", "preserved")
    Kp_g, Kp_d = _rows(model, general, "all"), _rows(model, domain, "all")
    parts = [(k, w) for k, w in ((Kp_g, s["lam_general"]), (Kp_d, s["lam_domain"])) if k is not None]
    Kp = torch.cat([k for k, _ in parts]) if parts else None
    pw = torch.cat([torch.full((len(k),), float(w), dtype=torch.float64) for k, w in parts]) if parts else 1.0
    W0 = kv_weights(model)
    dW, rep = closed_form_edit(W0, Kf, _values(Kg, W0), Kp, s["lam"], 1.0, pw, return_delta=True)
    info = dict(rep, seconds=round(time.time() - t0, 3), concepts=names, prompts=prompts, anchors=maps,
                protected=domain, n_general=len(general), n_domain=len(domain))
    return Delta(_name(concepts), "mace", {k: v.float() for k, v in dW.items()}, model.fingerprint(), dict(s), info)
