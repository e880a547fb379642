"""Evaluation as in the paper's tables: images of a (possibly edited) model, classifier ACC per concept,
"others", every combination of increments, restoration drift, how much an edit moves predictions, and the red-team
probe.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb`` and used by every later notebook and by
``python -m sepme_lib.bench``. Evaluation prompts come from the model's concept set (world: the concept with the
other attributes cycling, "a red circle in striped style", ...; SD: the artist's name, as the paper) with fixed
seeds, so that the same images are compared across edits (the paper: 50 seeds per concept).
"""
from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from .attacks import derived_embeddings
from .classifier import accuracy
from .concepts import concept_set
from .config import BadType, BadValue
from .deltas import edited_weights
from .model import prompt_list
from .nullspace import leakage


def eval_prompts(model, concept: str, n: int, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts of ``concept`` (:meth:`ConceptSet.eval_prompts`)."""
    return concept_set(model).eval_prompts(concept, n, seed)


def _weights(model, deltas, scales, weights):
    if weights is not None and deltas:
        raise BadValue("give deltas (and scales) or weights, not both")
    if deltas:
        return edited_weights(model, list(deltas), scales)
    return weights


def generate(model, prompts, seeds=None, deltas=None, scales=None, steps=None, guidance=None, weights=None,
             progress: bool = False) -> torch.Tensor:
    """Images in [0, 1] ``(N, 3, H, W)`` of ``theta + sum_i s_i dTheta_i`` (``deltas``, ``scales``; none: the original
    model) for ``prompts`` with one seed each (default ``0..N-1``; the same seed gives the same start noise)."""
    return model.sample(prompts, seeds=seeds, steps=steps, guidance=guidance, weights=_weights(model, deltas, scales,
                                                                                               weights),
                        progress=progress)


def _positive(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadValue(f"the number of images per concept must be a whole number >= 1, got {n!r}")
    return n


ANCHOR_STYLE = "blank"  # the anchor of an erased style: the prompt without its style phrase (the paper's blank)


def _eval_heads(model, judge, concepts, n, deltas, scales, weights, seed, steps, guidance) -> dict:
    """Sample every concept's ``n`` evaluation images in one call and read them with every head of the judge."""
    concepts = prompt_list(concepts)
    if not concepts:
        raise BadValue("acc_table needs at least one concept")
    n = _positive(n)
    if not callable(getattr(judge, "predict", None)) or not hasattr(judge, "heads_labels"):
        raise BadType(f"acc_table: judge must be a classifier (sepme_lib.load_classifier(model=model)), got "
                      f"{type(judge).__name__}")
    cs = concept_set(model)
    for c in concepts:
        cs.check(c)
    prompts = [p for c in concepts for p in cs.eval_prompts(c, n, seed)]
    seeds = [k for _ in concepts for k in range(seed, seed + n)]
    imgs = generate(model, prompts, seeds, deltas, scales, steps, guidance, weights)
    out = {}
    for i, c in enumerate(concepts):
        pred, targets = judge.predict(imgs[i * n:(i + 1) * n]), cs.eval_targets(c, n, seed)
        heads = {h: sum(p == t[h] for p, t in zip(pred[h], targets)) / n for h in pred if h in targets[0]}
        heads["acc"] = heads[cs.kind(c)]
        if ANCHOR_STYLE in judge.heads_labels.get("style", ()):
            heads["anchor"] = sum(p == ANCHOR_STYLE for p in pred["style"]) / n
        out[c] = heads
    return out


def acc_table(model, judge, concepts, n: int, deltas=None, scales=None, weights=None, seed: int = 0, steps=None,
              guidance=None) -> dict:
    """``{concept: ACC}``: for each concept, the share of its ``n`` evaluation images (seeds ``seed..seed+n-1``) that
    the judge assigns to it, under ``theta + sum_i s_i dTheta_i`` (the paper's ACC). All concepts are sampled in one
    call, so the batch is as large as the device allows."""
    heads = _eval_heads(model, judge, concepts, n, deltas, scales, weights, seed, steps, guidance)
    return {c: h["acc"] for c, h in heads.items()}


def acc_heads(model, judge, concepts, n: int, deltas=None, scales=None, weights=None, seed: int = 0, steps=None,
              guidance=None) -> dict:
    """What every head of the judge reads on the images of :func:`acc_table` (the same images):
    ``{concept: {"acc", "style", "shape", "colour", "anchor"}}``. ``style``/``shape``/``colour``: the share of images
    whose judged style/shape/colour is the one the prompt asks for (world; a CLIP judge on SD has only ``style``);
    ``acc``: the paper's ACC (the concept's own head); ``anchor``: the share judged as the anchor style ``blank``
    (where an erased style's images go). An "others" column that reads only the style head hides colour or shape
    damage (notebooks 02-06 report all three)."""
    return _eval_heads(model, judge, concepts, n, deltas, scales, weights, seed, steps, guidance)


def subsets(items):
    """All non-empty subsets, smallest first (the rows of the paper's Tables 3-5)."""
    items = list(items)
    return [list(c) for k in range(1, len(items) + 1) for c in itertools.combinations(items, k)]


def combination_table(model, judge, deltas, concepts, n: int, seed: int = 0, steps=None, guidance=None,
                      original: dict | None = None, progress: bool = True) -> dict:
    """Evaluate ``theta + sum_{i in S} dTheta_i`` for every non-empty subset S of ``deltas`` on ``concepts``.

    Returns ``dict(original={concept: acc}, rows=[{subset, acc: {concept: acc}}, ...], summary)`` where the summary
    holds ``erased_acc_max`` (worst ACC of an erased concept), ``others_ratio_min`` (worst ACC of a non-erased concept
    over its original ACC) and ``restoration_drift_max`` (largest |ACC - original| of a concept whose delta is in
    ``deltas`` but left out of the subset)."""
    by_name = {d.name: d for d in deltas}
    heads0 = None
    if original is None:
        heads0 = acc_heads(model, judge, concepts, n, seed=seed, steps=steps, guidance=guidance)
        original = {c: h["acc"] for c, h in heads0.items()}
    rows = []
    subs = subsets(by_name)
    for sub in (tqdm(subs, desc="combinations", leave=False) if progress else subs):
        heads = acc_heads(model, judge, concepts, n, [by_name[k] for k in sub], seed=seed, steps=steps,
                          guidance=guidance)
        rows.append(dict(subset=sub, acc={c: h["acc"] for c, h in heads.items()}, heads=heads))
    out = dict(original=original, rows=rows, summary=summarise(rows, original, list(by_name), heads0))
    if heads0 is not None:
        out["original_heads"] = heads0
    return out


def summarise(rows, original, delta_names, original_heads=None) -> dict:
    """``erased_acc_max``, ``others_ratio_min`` and ``restoration_drift_max`` of combination rows; with the rows'
    ``heads`` also ``others_colour_min`` / ``others_shape_min`` (worst colour / shape share of a kept class, over its
    original share when ``original_heads`` is given) and ``erased_to_anchor_min`` (the smallest share of an erased
    class's images judged as the anchor style)."""
    erased, ratios, drift = [], [], []
    kept = {"colour": [], "shape": []}
    anchor = []
    for row in rows:
        for c, a in row["acc"].items():
            h = row.get("heads", {}).get(c, {})
            if c in row["subset"]:
                erased.append(a)
                if "anchor" in h:
                    anchor.append(h["anchor"])
            else:
                ratios.append(a / max(original[c], 1e-9))
                if c in delta_names:
                    drift.append(abs(a - original[c]))
                for k in kept:
                    if k in h:
                        ref = original_heads[c][k] if original_heads else 1.0
                        kept[k].append(h[k] / max(ref, 1e-9))
    out = dict(erased_acc_max=max(erased, default=float("nan")), others_ratio_min=min(ratios, default=float("nan")),
               restoration_drift_max=max(drift, default=0.0))
    for k, v in kept.items():
        if v:
            out[f"others_{k}_min"] = min(v)
    if anchor:
        out["erased_to_anchor_min"] = min(anchor)
    return out


EMPTY_LABEL = "c_∅"


def leakage_table(model, deltas, concepts) -> dict:
    """Leakage certificates of SepME increments (notebook 03): ``{delta name: {"c_∅": x, concept name: x, ...}}``.

    Each entry is ``nullspace.leakage`` (``max_l ||A dW_l^T|| / ||A W_l^T||``, the relative change of the keys and
    values) maximised over the prompts of the column: the empty prompt ``c_∅``, or every prompt of a concept
    (:class:`~sepme_lib.concepts.Concept`). A SepME_1 increment's protected columns (``c_∅`` and the other concepts)
    sit at float precision; its own concept's column shows how far it moves that concept."""
    deltas, concepts = list(deltas), list(concepts)
    if not deltas or not concepts:
        raise ValueError("leakage_table needs at least one delta and one concept")
    out = {}
    for d in deltas:
        row = {EMPTY_LABEL: leakage(model, d, [""])[""]}
        for c in concepts:
            row[c.name] = max(leakage(model, d, c.prompts).values())
        out[d.name] = row
    return out


def others_mean(acc: dict, erased) -> float:
    """Mean ACC over the concepts not in ``erased`` (the paper's "Others" column)."""
    vals = [a for c, a in acc.items() if c not in set(erased)]
    return sum(vals) / max(1, len(vals))


@torch.no_grad()
def prediction_change(model, deltas, prompts, n: int = 4, seed: int = 0) -> dict:
    """``||eps_{theta+dtheta}(x_t,c) - eps_theta(x_t,c)|| / ||eps_theta(x_t,c) - eps_theta(x_t,c0)||`` per prompt on
    fixed noisy inputs: how much an edit moves a prompt's noise prediction, relative to that prompt's own concept
    representation ``r_theta(c)``. 0 = untouched."""
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, *model.latent_shape, generator=gen).to(model.device)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=gen).to(model.device)
    x = model.add_noise(z0, torch.randn(z0.shape, generator=gen).to(model.device), t)
    w = edited_weights(model, list(deltas))
    e0 = model.eps(x, t, model.empty().expand(n, -1, -1))
    out = {}
    for p in prompts:
        c = model.embed([p]).expand(n, -1, -1)
        before, after = model.eps(x, t, c), model.eps(x, t, c, w)
        out[p] = float((after - before).norm() / (before - e0).norm().clamp_min(1e-12))
    return out


# --------------------------------------------------------------------------------------------- red team
def redteam_embeddings(model, deltas, prompts, reg: float = 1e-3) -> torch.Tensor:
    """RECE Eq. (8) as an attack: for each prompt, the embedding ``c'`` whose keys/values under the edited model
    ``theta + sum dTheta`` best match what the prompt gives the original model (only to_k/to_v changes matter)."""
    deltas = list(deltas)
    for d in deltas:
        d.check_base(model)
    return derived_embeddings(model, deltas, model.embed(prompts), reg)


def redteam_probe(model, judge, deltas, concept: str, n: int = 16, reg: float = 1e-3, steps=None, guidance=None,
                  seed: int = 0, return_images: bool = False, with_prompt: bool = True) -> dict:
    """Red-team ACC (notebook 06): derive RECE's closed-form embedding of each evaluation prompt of ``concept`` for
    the edited model (:func:`redteam_embeddings`), sample the edited model from it with the evaluation seeds, and
    report the judge's ACC (``acc``) beside the edited model's ACC on the plain prompts (``acc_prompt``; skipped with
    ``with_prompt=False``). A robust erasure keeps both low."""
    deltas = list(deltas)
    cs = concept_set(model)
    prompts = cs.eval_prompts(concept, _positive(n), seed)
    w = edited_weights(model, deltas) if deltas else None
    emb = redteam_embeddings(model, deltas, prompts, reg) if deltas else model.embed(prompts)
    seeds = range(seed, seed + n)
    imgs = model.sample(None, seeds=seeds, steps=steps, guidance=guidance, weights=w, embeddings=emb)
    out = dict(concept=concept, acc=accuracy(judge, imgs, cs.kind(concept), concept), n=n, reg=reg)
    plain = None
    if with_prompt:
        plain = model.sample(prompts, seeds=seeds, steps=steps, guidance=guidance, weights=w)
        out["acc_prompt"] = accuracy(judge, plain, cs.kind(concept), concept)
    if return_images:
        out.update(images=imgs, images_prompt=plain)
    return out
