"""SPEED (Li et al., 2025, "Scalable, Precise, and Efficient Concept Erasure for Diffusion Models"): a closed-form
null-space edit with a large, filtered and augmented prior, a soft null space and invariant constraints on the empty
prompt. Introduced in ``notebooks/08_beyond_prompt_level_separability.ipynb``; compared in notebook 06.

Every equation below is the authors' released ``train_erase_null.py`` (``edit_model``), computed per edited matrix
``W`` (``d_out x d_in``) from the **original** weights, with embedding rows ``c`` as column vectors:

* targets: ``T = mean_i sum_rows c c^T`` and ``X = mean_i sum_rows a c^T`` over the erased texts ``i`` (rows ``c``)
  and their anchors (rows ``a``); the official rows are each text's last word (``keys="last"``; ``''`` -> BOS);
* invariants ``K_2`` (``d_in x 4``): the BOS row of ``c_0`` and 3 k-means centres of its other rows (:func:`invariants`);
* the erase update without preservation ``dW_e = W (X - T) (I + T)^-1`` (UCE with ``lambda = 1``);
* prior filtering (IPF): keep the prior rows ``c`` with ``||dW_e c|| > mean`` (:func:`filter_prior`);
* directed augmentation (DPA): ``c~ = c + (xi . v) v``, ``xi ~ N(0, I)``, ``v`` the right singular vector of ``W``'s
  smallest singular value, ``aug`` draws per row, kept when ``||dW_e c~|| > mean`` over the chunk's draws
  (:func:`augment`);
* soft null space: ``Sigma_R = (1/N) sum c c^T`` over the kept rows, ``P = U_{<tau} U_{<tau}^T`` from its eigenvectors
  with eigenvalue ``< threshold`` (an absolute cut);
* the update (:func:`speed_update`), ``M = (T P + alpha I)^-1``::

      dW = W (X - T) P [I - M K_2 (K_2^T P M K_2 + lambda I)^-1 K_2^T P] M

  with ``lambda = 0`` ``dW K_2 = 0`` exactly: ``c_0``'s BOS row and its cluster centres keep their keys and values.

Adaptation to the bundled world (``methods.DEFAULTS["speed"]["tiny"]``, measured in the README): the erased texts are
the concept's prompts with their anchors (``targets="prompts"``), the rows are ``1..L-1`` of each text (``keys="all"``,
the authors' own mode for nudity; their last-word rows left striped at 0.38 ACC here), the prior is the general prior
of concept-level protection (``concepts.prior_captions``) with the same rows, the threshold ``1e-5`` (0.1 keeps 231 of
256 dimensions on this model). On SD the defaults are the paper's: ``to_v`` only, the concept names to ``anchor``
("art" for styles, as the authors' scripts), ``aug 10``, ``threshold 0.1``, ``alpha 1``, ``lambda 0``, filter on.
Differences from the released code: ``docs/DESIGN.md``, "Beyond the paper".
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .concepts import anchors_for, prior_captions
from .config import SepmeError
from .deltas import Delta

KEYS = ("last", "tail", "all")


class SpeedError(SepmeError, ValueError):
    """Bad input to :func:`speed` (the message names the problem and the fix)."""


def kmeans(X: torch.Tensor, k: int, seed: int = 0, tol: float = 1e-4, max_iter: int = 300):
    """k-means as ``kmeans_pytorch`` 0.3 (the package SPEED calls): centres start at ``k`` distinct rows chosen by
    ``np.random`` (here ``RandomState(seed)``), assign by squared Euclidean distance, move to the means, stop when
    ``(sum ||shift||)^2 < tol``. Returns ``(labels, centres)``."""
    X = X.detach().double().cpu()
    if not 1 <= k <= len(X):
        raise SpeedError(f"k-means needs 1 <= k <= {len(X)} rows, got k={k}")
    centres = X[np.random.RandomState(seed).choice(len(X), k, replace=False)].clone()
    for _ in range(max_iter):
        labels = ((X[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        before = centres.clone()
        for j in range(k):
            if (labels == j).any():  # kmeans_pytorch would write NaN for an empty cluster
                centres[j] = X[labels == j].mean(0)
        if float((centres - before).pow(2).sum(1).sqrt().sum()) ** 2 < tol:
            break
    return labels, centres


def invariants(model, clusters: int = 3, seed: int = 0) -> torch.Tensor:
    """``K_2`` ``(d_in, 1 + clusters)``: the BOS row of ``c_0`` and ``clusters`` k-means centres of its other rows;
    ``(d_in, 0)`` where ``c_0`` is zeros (SDXL's empty prompt, ``force_zeros_for_empty_prompt``: ``W 0 = 0`` is kept by
    every edit, there is nothing to keep invariant)."""
    c0 = model.empty_context()[0].double().cpu()
    if not c0.abs().max() > 0:
        return c0.new_zeros(c0.shape[1], 0)
    return torch.cat([c0[:1], kmeans(c0[1:], clusters, seed)[1]]).T


def text_rows(model, texts, guides=None, keys: str = "last"):
    """Embedding rows of ``texts`` (and the aligned rows of ``guides``): ``keys="last"`` one row per text, its last
    word (SPEED's ``attention_mask.sum() - 2``; ``''`` -> BOS); ``"tail"`` the last word to the end (UCE's
    ``"tail"`` rows); ``"all"`` rows ``1..L-1`` (SPEED's nudity case). Float64 on the CPU."""
    if keys not in KEYS:
        raise SpeedError(f"unknown keys {keys!r}; use one of {KEYS}")
    texts = list(texts)
    E, G = _embed(model, texts), (None if guides is None else _embed(model, list(guides)))
    rows, grows = [], []
    for i, t in enumerate(texts):
        g = None if guides is None else guides[i]
        if keys == "last":
            r, rg = [len(model.token_ids(t)) - 2], [len(model.token_ids(g)) - 2] if g is not None else None
            r = [max(0, r[0])]
            rg = [max(0, rg[0])] if rg is not None else None
        elif keys == "tail":  # UCE's rows: from each text's last word to the end, aligned from the guide's last word
            n, ng = model.word_count(t), model.word_count(g if g is not None else t)
            count = min(E.shape[1] - n, E.shape[1] - ng)
            r, rg = list(range(n, n + count)), list(range(ng, ng + count))
        else:
            r = rg = list(range(1, E.shape[1]))
        rows.append(E[i, r])
        if G is not None:
            grows.append(G[i, rg])
    return torch.cat(rows), (torch.cat(grows) if G is not None else None)


def _embed(model, texts) -> torch.Tensor:
    """All ``L`` rows of every text (``''`` is ``c_0``), float64 on the CPU, one text-encoder call."""
    words = [t for t in texts if t != ""]
    E = model.embed_context(words).double().cpu() if words else None
    it = iter(range(len(words)))
    c0 = model.empty_context()[0].double().cpu()
    return torch.stack([c0 if t == "" else E[next(it)] for t in texts])


def filter_prior(R: torch.Tensor, erase_weight: torch.Tensor) -> torch.Tensor:
    """Influence-based prior filtering: the rows ``c`` of ``R`` with ``||dW_e c|| > mean`` (strictly)."""
    norms = (R @ erase_weight.T).norm(dim=1)
    return R[norms > norms.mean()]


def augment(R: torch.Tensor, v: torch.Tensor, erase_weight: torch.Tensor, n: int, gen: torch.Generator,
            mini_batch: int = 8) -> torch.Tensor:
    """Directed prior augmentation of one chunk: ``n`` draws ``c + (xi . v) v`` per row (``xi ~ N(0, I)`` from
    ``gen``, mini-batches of 8 rows as the authors' loop), kept when ``||dW_e c~|| > mean`` over the chunk's draws."""
    out, norms = [], []
    for i in range(0, len(R), mini_batch):
        rows = R[i:i + mini_batch]
        for _ in range(n):
            xi = torch.randn(rows.shape, generator=gen, dtype=torch.float64)
            noisy = rows + (xi @ v)[:, None] * v  # = xi @ (v v^T), the authors' form, without the d x d product
            out.append(noisy)
            norms.append((noisy @ erase_weight.T).norm(dim=1))
    out, norms = torch.cat(out), torch.cat(norms)
    return out[norms > norms.mean()]


def speed_update(W, T, X, sigma_r, K2, threshold: float, retain_scale: float, lamb: float):
    """``dW = W (X - T) P [I - M K_2 (K_2^T P M K_2 + lambda I)^-1 K_2^T P] M``, ``M = (T P + alpha I)^-1``,
    ``P`` the projector on the eigenvectors of ``sigma_r`` with eigenvalue ``< threshold`` (float64)."""
    d = W.shape[1]
    eye, eye2 = torch.eye(d, dtype=torch.float64), torch.eye(K2.shape[1], dtype=torch.float64)
    S, U = torch.linalg.eigh(sigma_r)  # symmetric PSD: the eigenvectors are the authors' torch.svd(sigma_r).U
    Uk = U[:, S < threshold]
    P = Uk @ Uk.T
    M = torch.linalg.inv(T @ P + retain_scale * eye)
    inner = torch.linalg.inv(K2.T @ P @ M @ K2 + lamb * eye2)
    return W @ (X - T) @ P @ (eye - M @ K2 @ inner @ K2.T @ P) @ M, int(Uk.shape[1])


def _texts(model, concepts, s, anchor):
    """The erased texts and their anchors: the concept names (``targets="names"``, SPEED) or every prompt."""
    if s["targets"] == "names":
        guides = [anchor if isinstance(anchor, str) else s["anchor_text"]] * len(concepts)
        if anchor is not None and not isinstance(anchor, str):
            guides = list(anchor)
        return [c.name for c in concepts], guides
    texts = [p for c in concepts for p in c.prompts]
    return texts, [g for c in concepts for g in anchors_for(model, c, anchor)]


def speed(model, concepts, s: dict, anchor=None, prior=None) -> Delta:
    """SPEED on ``concepts`` (one increment for all of them, as the authors erase many concepts in one edit),
    notebook 08. ``s``: resolved settings (``methods.DEFAULTS["speed"]``). ``anchor``: the anchor text(s);
    ``prior``: the prior texts (a list), or a caption file's path on SD (default: ``concepts.prior_captions``
    without the erased concepts, SPEED's whole-word filter). ``info`` records the prior size, the rows kept by the
    filter and the augmentation, and the soft null-space dimension per matrix."""
    t0 = time.time()
    names = [c.name for c in concepts]
    texts, guides = _texts(model, concepts, s, anchor)
    if len(guides) != len(texts):
        raise SpeedError(f"{len(guides)} anchors for {len(texts)} erased texts; give one anchor, or one per text")
    retain = prior if isinstance(prior, (list, tuple)) else prior_captions(model, names, prior)
    retain = [t for t in dict.fromkeys(retain) if t not in set(texts)]
    if not retain:
        raise SpeedError("the prior is empty; give prior texts (prior=[...]) or a caption file")
    # T, X: mean over the erased texts of sum_rows c c^T and a c^T (the authors average over targets)
    T = X = 0.0
    for t, g in zip(texts, guides):
        c, a = text_rows(model, [t], [g], s["keys"])
        T, X = T + c.T @ c, X + a.T @ c
    T, X = T / len(texts), X / len(texts)
    R = text_rows(model, retain, keys=s["keys"])[0]
    gen = torch.Generator().manual_seed(s["seed"])
    R = R[torch.randperm(len(R), generator=gen)]  # the authors shuffle before chunking
    K2 = invariants(model, s["clusters"], s["seed"])
    eye = torch.eye(T.shape[0], dtype=torch.float64)
    W0 = {k: v.detach() for k, v in model.params(model.kv_weight_names()).items()}
    names_v = [k for k in W0 if k.endswith("to_v.weight") or (s["params"] == "KV" and k.endswith("to_k.weight"))]
    out, kept, dims = {}, [], []
    for k in names_v:
        W = W0[k].double().cpu()
        erase_weight = W @ (X - T) @ torch.linalg.inv(eye + T)
        v = torch.linalg.svd(W, full_matrices=False)[2][-1]  # the smallest of min(d_out, d_in) singular values
        rows = filter_prior(R, erase_weight) if s["aug"] > 0 and s["filter"] else R
        chunks = []
        for j in range(0, len(rows), s["chunk"]):
            ch = rows[j:j + s["chunk"]]
            chunks.append(torch.cat([ch, augment(ch, v, erase_weight, s["aug"], gen)]) if s["aug"] > 0 else ch)
        allrows = torch.cat(chunks)
        dW, dim = speed_update(W, T, X, allrows.T @ allrows / len(allrows), K2, s["threshold"], s["retain_scale"],
                               s["lamb"])
        out[k] = dW.float().to(W0[k].device)
        kept.append(len(allrows))
        dims.append(dim)
    info = dict(seconds=round(time.time() - t0, 3), concepts=names, prompts=texts, anchors=guides, protected=[""],
                prior=len(retain), prior_rows=len(R), rows_used=kept, soft_null_dim=dims)
    return Delta("+".join(names), "speed", out, model.fingerprint(), dict(s), info)
