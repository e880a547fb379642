"""Layer 4: evaluation as in the paper's tables -- classifier ACC per concept, "others", combinations,
restoration drift and weight change (perceptual distance: ``perceptual.py``).

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb`` and used by every later notebook and by
``python -m sepme_lib.bench``. Evaluation prompts for a concept cycle the other attributes of the world
("a red circle in striped style", "a blue square in striped style", ...), with fixed seeds, so that the
same images are compared across edits.
"""
from __future__ import annotations

import itertools


from . import world
from .classifier import accuracy as clf_accuracy
from .deltas import edited_weights


def eval_prompts(concept: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts showing ``concept`` (style prompts name a style; shape prompts use plain style)."""
    return [s.caption() for s in world.eval_specs(concept, n, seed=seed)]


def generate(model, concept: str, n: int, weights=None, seed: int = 0, steps=None, guidance=None):
    """Images ``(n,3,32,32)`` in [0, 1] of ``concept``'s evaluation prompts, seeds ``seed..seed+n-1``."""
    return model.sample(eval_prompts(concept, n, seed), seeds=range(seed, seed + n), steps=steps,
                        guidance=guidance, weights=weights)


def concept_acc(model, clf, concept: str, n: int, weights=None, seed: int = 0, steps=None, guidance=None) -> float:
    """The paper's ACC: fraction of images generated for ``concept`` that the classifier calls ``concept``."""
    imgs = generate(model, concept, n, weights, seed, steps, guidance)
    return clf_accuracy(clf, imgs, world.concept_kind(concept), concept)


def acc_table(model, clf, concepts, n: int, weights=None, seed: int = 0, steps=None, guidance=None) -> dict:
    """``{concept: ACC}`` for one (possibly edited) model."""
    return {c: concept_acc(model, clf, c, n, weights, seed, steps, guidance) for c in concepts}


def subsets(items):
    """All non-empty subsets, smallest first (the rows of the paper's Tables 3-5)."""
    items = list(items)
    return [list(c) for k in range(1, len(items) + 1) for c in itertools.combinations(items, k)]


def combination_table(model, clf, deltas, concepts, n: int, seed: int = 0, steps=None, guidance=None,
                      original: dict | None = None, progress=True) -> dict:
    """Evaluate ``theta + sum_{i in S} dTheta_i`` for every non-empty subset S of ``deltas`` on ``concepts``.

    Returns ``dict(original={concept: acc}, rows=[{subset, acc: {concept: acc}}, ...], summary)`` where the
    summary holds ``erased_acc_max`` (worst ACC of an erased concept), ``others_ratio_min`` (worst ACC of
    a non-erased concept over its original ACC) and ``restoration_drift_max`` (largest |ACC - original|
    of a concept whose delta is in ``deltas`` but left out of the subset).
    """
    by_name = {d.name: d for d in deltas}
    if original is None:
        original = acc_table(model, clf, concepts, n, None, seed, steps, guidance)
    rows = []
    subs = subsets(by_name)
    if progress:
        from tqdm.auto import tqdm
        subs = tqdm(subs, desc="combinations", leave=False)
    for sub in subs:
        w = edited_weights(model, [by_name[k] for k in sub])
        rows.append(dict(subset=sub, acc=acc_table(model, clf, concepts, n, w, seed, steps, guidance)))
    return dict(original=original, rows=rows, summary=summarise(rows, original, list(by_name)))


def summarise(rows, original, delta_names) -> dict:
    erased, ratios, drift = [], [], []
    for row in rows:
        for c, a in row["acc"].items():
            if c in row["subset"]:
                erased.append(a)
            else:
                ratios.append(a / max(original[c], 1e-9))
                if c in delta_names:
                    drift.append(abs(a - original[c]))
    return dict(erased_acc_max=max(erased, default=float("nan")), others_ratio_min=min(ratios, default=float("nan")),
                restoration_drift_max=max(drift, default=0.0))


def others_mean(acc: dict, erased) -> float:
    """Mean ACC over the concepts not in ``erased`` (the paper's "others" column)."""
    vals = [a for c, a in acc.items() if c not in set(erased)]
    return sum(vals) / max(1, len(vals))


def markdown_table(rows, columns, header=None) -> str:
    """A small markdown table from a list of dicts (values formatted to 2-3 significant digits)."""
    header = header or columns

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)
