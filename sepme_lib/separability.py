"""Concept-level separability (beyond the paper): how far an erasure reaches beyond the prompts it was given.

Introduced in ``notebooks/08_beyond_prompt_level_separability.ipynb``; ``python -m sepme_lib.bench separability``.

SepME's certificate (``nullspace.leakage``) is exact for the prompts stacked into ``A_i`` and says nothing about any
other caption. This module measures the rest on captions that no method protects or trains on: every concept's
captions are split once into build and held-out parts (``concepts.caption_split``); an erasure may use build
captions only (checked: ``heldout_overlap`` must be 0), and everything here is scored on held-out ones:

* keys/values (``nullspace.leakage`` = ``max_l ||A dW_l^T|| / ||A W_l^T||`` per caption): ``certified_leakage_max``
  (the prompts the method was told to protect), ``heldout_protected_kv_max`` / ``_median`` (the other erased
  concepts), ``unrelated_kv_median`` / ``_max`` (every other concept of the set, ``blank``'s style-free captions
  included), ``own_kv_min`` (the erased concept: how strongly it is moved), ``delta_rel_norm_max``
  (``max_l ||dW_l|| / ||W_l||``);
* images of held-out captions judged as in the paper: ``erased_heldout_acc``, ``to_anchor_fraction`` (share of the
  erased concept's images the judge calls ``blank``, the anchor), ``heldout_protected_acc_ratio_min`` and
  ``unrelated_acc_ratio_min`` (ACC over the original model's), ``restoration_drift_max`` over every combination;
* ``seconds_per_concept`` and the trade-off curve (:func:`tradeoff`): held-out protection against erasure strength
  as the soft null-space cut moves.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import numpy as np
import torch

from . import config, families, methods, nullspace, report, sepme
from .classifier import load_classifier, predict
from .concepts import as_concepts, caption_split, concept_set, listed_prompts, prior_captions
from .deltas import edited_weights
from .loading import load_model

# the goals the benchmark is read against (README, "Beyond the paper"): (direction, value)
GOALS = dict(certified_leakage_max=("<=", 1e-5), heldout_protected_kv_max=("<=", 0.05), unrelated_kv_median=("<=", 0.10),
             own_kv_min=(">=", 1.0), erased_heldout_acc_max=("<=", 0.10), heldout_protected_acc_ratio_min=(">=", 0.98),
             unrelated_acc_ratio_min=(">=", 0.98), to_anchor_fraction_min=(">=", 0.80),
             delta_rel_norm_max=("<=", 0.3), restoration_drift_max=("<=", 0.02))
# what the benchmark compares: SepME (the paper's prompt-level default and concept-level), SPEED, UCE, MACE
SPECS = {"sepme1": dict(method="sepme", mode="separate"), "sepme2": dict(method="sepme", mode="iterative"),
         "sepme1_concept": dict(method="sepme", mode="separate", concept=True),
         "sepme2_concept": dict(method="sepme", mode="iterative", concept=True),
         "speed": dict(method="speed"), "uce": dict(method="uce"), "mace": dict(method="mace")}
# the trade-off curve's points (settings of methods.concept_level) per profile
CURVE = {"ci": ({"soft": 1e-6}, {"soft": 1e-4}),
         "full": ({"soft": 3e-7}, {"soft": 1e-6}, {"soft": 1e-5}, {"soft": 1e-4}, {"soft": 1e-3},
                  {"soft": 1e-6, "anchor_tau": 0.5}, {"soft": 1e-6, "anchor_tau": 0.15})}
COLUMNS = ["method", "erased", "certified_leakage_max", "heldout_protected_kv_max", "heldout_protected_kv_median",
           "unrelated_kv_median", "unrelated_kv_max", "own_kv_min", "heldout_protected_acc_ratio_min",
           "unrelated_acc_ratio_min", "erased_heldout_acc", "to_anchor_fraction", "delta_rel_norm_max"]
HEADER = ["method", "erased", "certified", "held-out prot. KV max", "med", "unrel. KV med", "max", "own KV min",
          "prot. ACC ratio", "unrel. ACC ratio", "erased ACC", "to anchor", "‖ΔW‖/‖W‖"]


def heldout(model, name: str, erased) -> dict:
    """Held-out captions around erasing ``name`` when ``erased`` are the concepts the course erases: ``own`` (of
    ``name``), ``protected`` (of the other erased concepts), ``unrelated`` (of every other evaluated concept)."""
    cs = concept_set(model)
    others = [c for c in erased if c != name]
    unrelated = [c for c in cs.evaluate if c not in erased]
    return dict(own=caption_split(model, name)[1], protected=[p for c in others for p in caption_split(model, c)[1]],
                unrelated=[p for c in unrelated for p in caption_split(model, c)[1]])


def prompt_level(model, prof: dict, concepts=None, progress: bool = False) -> list:
    """The paper's SepME_1 increments of the erased concepts (notebook 08): on the bundled model the bundled ones
    (``data/deltas``, trained with the defaults), otherwise trained now with ``methods.course_settings`` on
    ``concepts`` (default: the concept set's erased concepts with ``prof["n_ref"]`` reference images)."""
    names = list(concept_set(model).erase)
    if families.family_of(model).bundled_deltas:
        return sepme.bundled_deltas(model, names)
    return methods.erase(model, concepts or names, method="sepme", progress=progress, n_ref=prof["n_ref"],
                         **methods.course_settings("sepme", model, prof))


def rel_norm(model, delta) -> float:
    """``max_l ||dW_l|| / ||W_l||`` over the matrices the delta edits."""
    params = dict(model.unet.named_parameters())
    return max(float(v.norm() / params[k].detach().float().norm()) for k, v in delta.tensors.items())


def used_prompts(delta) -> set:
    """Every prompt an increment was trained on or told to protect (its ``info``)."""
    info = delta.info
    prior = info.get("prior", [])
    return set(info.get("prompts", [])) | set(info.get("protected", [])) | set(prior if isinstance(prior, list) else [])


def kv_metrics(model, delta, name: str, erased) -> dict:
    """The key/value columns of one increment erasing ``name`` (module docstring)."""
    h = heldout(model, name, erased)
    kv = {k: np.array(list(nullspace.leakage(model, delta, v).values())) for k, v in h.items() if v}
    certified = [p for p in delta.info.get("protected", []) if p]
    return dict(certified_leakage_max=max(nullspace.leakage(model, delta, [""] + certified).values()),
                heldout_protected_kv_max=float(kv["protected"].max()) if "protected" in kv else float("nan"),
                heldout_protected_kv_median=float(np.median(kv["protected"])) if "protected" in kv else float("nan"),
                unrelated_kv_median=float(np.median(kv["unrelated"])), unrelated_kv_max=float(kv["unrelated"].max()),
                own_kv_min=float(kv["own"].min()), delta_rel_norm_max=rel_norm(model, delta),
                heldout_overlap=len(used_prompts(delta) & set(p for v in h.values() for p in v)))


def heldout_acc(model, judge, deltas, names, n: int, steps=None, seed: int = 0) -> dict:
    """``{concept: (ACC, share judged blank)}`` on ``n`` images of each concept's held-out captions (cycled; seeds
    ``seed..seed+n-1``) under ``theta + sum dTheta`` (``deltas``; none: the original model)."""
    cs = concept_set(model)
    prompts, seeds = [], []
    for c in names:
        caps = caption_split(model, c)[1]
        prompts += [caps[i % len(caps)] for i in range(n)]
        seeds += list(range(seed, seed + n))
    imgs = model.sample(prompts, seeds=seeds, steps=steps, weights=edited_weights(model, list(deltas)) if deltas else None)
    out = {}
    for i, c in enumerate(names):
        pred = predict(judge, imgs[i * n:(i + 1) * n])[cs.kind(c)]
        out[c] = (sum(p == c for p in pred) / n, sum(p == "blank" for p in pred) / n)
    return out


def erase_for_bench(model, key: str, names, progress: bool = False, **overrides):
    """The increments of one benchmark entry (:data:`SPECS`): SepME erases all ``names`` in one call (one increment
    each); SPEED, UCE and MACE erase each concept alone (MACE's general prior from build captions only). Returns
    ``(deltas, wall seconds, CPU seconds of this process)``."""
    spec = dict(SPECS[key])
    method = spec.pop("method")
    t0, c0 = time.time(), time.process_time()
    if method == "sepme":
        extra = methods.concept_level(model, **overrides) if spec.pop("concept", False) else dict(overrides)
        ds = methods.erase(model, names, method="sepme", progress=progress, **spec, **extra)
    else:
        ds = []
        for c in names:
            extra = dict(overrides)
            if method == "mace":
                extra.setdefault("general", prior_captions(model, [c])[:64])
            ds += methods.erase(model, [c], method=method, n_ref=1, **extra)  # closed forms read no images
    return ds, time.time() - t0, time.process_time() - c0


def evaluate_entry(model, judge, deltas, erased, n: int, steps=None, original=None) -> dict:
    """Rows (one per erased concept, its increment alone) and the summary of one benchmark entry; the restoration
    drift comes from every combination of the increments, scored on held-out captions."""
    cs = concept_set(model)
    names = list(cs.evaluate)
    original = original or {c: a for c, (a, _) in heldout_acc(model, judge, [], names, n, steps).items()}
    by_name = {d.name: d for d in deltas}
    rows, drift = [], []
    for sub in [list(c) for k in range(1, len(by_name) + 1) for c in itertools.combinations(by_name, k)]:
        acc = heldout_acc(model, judge, [by_name[k] for k in sub], names, n, steps)
        drift += [abs(acc[c][0] - original[c]) for c in by_name if c not in sub]
        if len(sub) != 1:
            continue
        name = sub[0]
        row = dict(erased=name, **kv_metrics(model, by_name[name], name, erased))

        def ratio(cons):
            return min((acc[c][0] / max(original[c], 1e-9) for c in cons), default=float("nan"))

        row.update(heldout_protected_acc_ratio_min=ratio([c for c in erased if c != name]),
                   unrelated_acc_ratio_min=ratio([c for c in names if c not in erased]),
                   erased_heldout_acc=acc[name][0], to_anchor_fraction=acc[name][1])
        rows.append(row)
    summary = summarise(rows)
    summary["restoration_drift_max"] = max(drift, default=0.0)
    return dict(rows=rows, summary=summary)


def summarise(rows) -> dict:
    """The worst value of each column over the rows (max of what should be small, min of what should be large)."""
    def worst(k, f):
        vals = [r[k] for r in rows if k in r and r[k] == r[k]]
        return f(vals) if vals else float("nan")

    return dict(certified_leakage_max=worst("certified_leakage_max", max),
                heldout_protected_kv_max=worst("heldout_protected_kv_max", max),
                heldout_protected_kv_median=worst("heldout_protected_kv_median", max),
                unrelated_kv_median=worst("unrelated_kv_median", max), unrelated_kv_max=worst("unrelated_kv_max", max),
                own_kv_min=worst("own_kv_min", min),
                heldout_protected_acc_ratio_min=worst("heldout_protected_acc_ratio_min", min),
                unrelated_acc_ratio_min=worst("unrelated_acc_ratio_min", min),
                erased_heldout_acc_max=worst("erased_heldout_acc", max),
                to_anchor_fraction_min=worst("to_anchor_fraction", min),
                delta_rel_norm_max=worst("delta_rel_norm_max", max), heldout_overlap=worst("heldout_overlap", max))


def meets(summary: dict) -> dict:
    """``{goal: True/False}`` for every goal of :data:`GOALS` the summary has."""
    out = {}
    for k, (op, v) in GOALS.items():
        x = summary.get(k)
        if x is not None and x == x:
            out[k] = bool(x <= v) if op == "<=" else bool(x >= v)
    return out


def timing(model, names, repeats: int = 1, progress: bool = False, first=None) -> dict:
    """Seconds of SepME_1 (separate mode) per concept with today's settings (``methods.DEFAULTS``) and with
    :data:`methods.CONCEPT_LEVEL`, measured in the same process: steps, seconds per step (the training loop) and
    per concept (wall time of ``erase``), medians over ``repeats`` runs, and the speed-up. ``first``: already
    measured runs ``{"today": (deltas, seconds), "concept": ...}`` counted as the first repeat."""
    out = {}
    for key, extra in (("today", {}), ("concept", methods.concept_level(model))):
        runs = [first[key]] if first and key in first else []
        while len(runs) < repeats:
            t0, c0 = time.time(), time.process_time()
            ds = methods.erase(model, names, method="sepme", progress=progress, **extra)
            runs.append((ds, time.time() - t0, time.process_time() - c0))
        steps = [d.info["steps"] for d in runs[0][0]]
        per_step = [d.info["seconds"] / d.info["steps"] for r in runs for d in r[0]]
        out[key] = dict(steps=steps, seconds_per_step=round(statistics.median(per_step), 4),
                        seconds_per_concept=round(statistics.median(r[1] / len(r[0]) for r in runs), 2),
                        cpu_seconds_per_concept=round(statistics.median(r[2] / len(r[0]) for r in runs), 2),
                        runs=[round(r[1] / len(r[0]), 2) for r in runs])
    for k in ("seconds_per_concept", "cpu_seconds_per_concept"):
        out["speedup" if k == "seconds_per_concept" else "cpu_speedup"] = round(out["today"][k] / out["concept"][k], 2)
    out["threads"] = torch.get_num_threads()
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]  # what else was running (1, 5, 15 minutes)
    return out


def rel_norm_floor(model, delta, name: str) -> float:
    """A lower bound on ``||dW_l||_F / ||W_l||_F`` for any increment inside the same basis that moves the erased
    concept's build captions as much as ``delta`` does: ``||A dW^T||_F <= ||A S||_2 ||dW||_F`` (``A`` their rows,
    ``S`` the increment's basis, rebuilt from ``info``; the identity for methods without one). Max over layers."""
    A = nullspace.stack_rows(model, caption_split(model, name)[0]).double().cpu()
    info = delta.info
    if "prior" in info and isinstance(info["prior"], list):
        S = nullspace.null_space(nullspace.stack_rows(model, info["protected"]),
                                 prior=nullspace.stack_rows(model, info["prior"]), soft=info["soft"]).basis
    elif "null_dim" in info:
        S = nullspace.null_space(nullspace.stack_rows(model, info["protected"])).basis
    else:
        S = torch.eye(A.shape[1], dtype=torch.float64)
    gain = float(torch.linalg.matrix_norm(A @ S, ord=2))
    params = dict(model.unet.named_parameters())
    return max(float((A @ v.double().cpu().T).norm() / gain / params[k].detach().double().norm())
               for k, v in delta.tensors.items())


def tradeoff(model, judge, name, points, n: int, steps=None, erased=None, progress: bool = False,
             n_ref: int = 64, judged=None) -> list:
    """The trade-off curve: SepME with concept-level protection erasing ``name`` (a name or a ``Concept``; the other
    erased concepts' listed
    prompts protected exactly, as in separate mode) for each settings override in ``points`` (e.g. the soft cut);
    per point the null dimension, steps, held-out key/value changes, ``||dW||/||W||`` and its floor
    (:func:`rel_norm_floor`), and the held-out ACC of the erased, protected and unrelated concepts. ``n_ref``:
    reference images of the concept; ``judged``: the concepts whose held-out ACC is measured (default: all)."""
    cs = concept_set(model)
    concept = as_concepts(model, [name], n_ref=n_ref)[0]  # a name, or a Concept with its references
    name = concept.name
    erased = list(erased or cs.erase)
    protect = [p for c in erased if c != name for p in listed_prompts(model, c)]
    names = list(judged or cs.evaluate)
    original = {c: a for c, (a, _) in heldout_acc(model, judge, [], names, n, steps).items()}
    rows = []
    for point in points:
        t0 = time.time()
        try:
            d = methods.erase(model, [concept], method="sepme", protect=protect, progress=progress,
                              **methods.concept_level(model, **point))[0]
        except nullspace.CapacityError as e:  # the cut left too few dimensions: a point of the curve too
            rows.append(dict(point, error=str(e).split(";")[0]))
            continue
        secs = time.time() - t0
        acc = heldout_acc(model, judge, [d], names, n, steps)
        kv = kv_metrics(model, d, name, erased)
        rows.append(dict(point, null_dim=d.info["null_dim"], steps=d.info["steps"], seconds=round(secs, 1),
                         heldout_protected_kv_max=kv["heldout_protected_kv_max"],
                         unrelated_kv_median=kv["unrelated_kv_median"], own_kv_min=kv["own_kv_min"],
                         delta_rel_norm_max=kv["delta_rel_norm_max"], rel_norm_floor=rel_norm_floor(model, d, name),
                         erased_heldout_acc=acc[name][0], to_anchor_fraction=acc[name][1],
                         protected_acc_ratio_min=min(acc[c][0] / max(original[c], 1e-9) for c in erased if c != name),
                         unrelated_acc_ratio_min=min(acc[c][0] / max(original[c], 1e-9) for c in names
                                                     if c not in erased)))
    return rows


def markdown(out: dict) -> str:
    """The benchmark as markdown: the per-concept table, the summary against the goals, the speed and the curve."""
    rows = [dict(r, method=m) for m, e in out["entries"].items() for r in e["rows"]]
    parts = ["### Held-out separability (one increment alone; held-out captions)",
             report.markdown_table(rows, COLUMNS, HEADER)]
    keys = list(GOALS) + ["seconds_per_concept", "cpu_seconds_per_concept"]
    summ = []
    for m, e in out["entries"].items():
        ok = meets(e["summary"])
        summ.append({"method": m, **{k: report.fmt(e["summary"].get(k)) + (" ✓" if ok.get(k) else "")
                                     for k in keys}})
    goal = {"method": "goal", **{k: f"{GOALS[k][0]} {report.fmt(GOALS[k][1])}" for k in GOALS}}
    parts += ["### Summary (worst over the erased concepts; ✓ = goal met)", report.markdown_table([goal] + summ,
                                                                                               ["method"] + keys)]
    if out.get("timing"):
        t = out["timing"]
        trows = [dict(settings=k, steps=str(t[k]["steps"]), seconds_per_step=t[k]["seconds_per_step"],
                      seconds_per_concept=t[k]["seconds_per_concept"],
                      cpu_seconds_per_concept=t[k].get("cpu_seconds_per_concept")) for k in ("today", "concept")]
        parts += [f"### Speed (SepME_1, {t['threads']} thread(s), load average {t.get('load_average')}; speed-up "
                  f"{t['speedup']}x wall, {t.get('cpu_speedup')}x CPU)",
                  report.markdown_table(trows, list(trows[0]))]
    if out.get("curve"):
        cols = list(dict.fromkeys(k for r in out["curve"] for k in r))
        parts += [f"### Trade-off curve ({out.get('curve_concept')})", report.markdown_table(out["curve"], cols)]
    return "\n\n".join(parts)


def benchmark(profile: str = "ci", entries=None, progress: bool = False, checkpoint=None, model=None, judge=None,
              curve: bool = True, repeats=None) -> dict:
    """The separability benchmark (``python -m sepme_lib.bench separability``): every entry of :data:`SPECS` (or
    ``entries``) on the concept set's erased concepts, scored on held-out captions (``n`` = the profile's
    ``images_per_concept`` per concept and combination), the speed of SepME today and concept-level
    (:func:`timing`, ``repeats``: 3 in ``full``, 1 in ``ci``) and the trade-off curve (:data:`CURVE`).
    ``checkpoint(out)`` is called after each part with the results so far."""
    prof = config.profile(config.bench_profile(profile))
    entries = list(entries or SPECS)
    unknown = [e for e in entries if e not in SPECS]
    if unknown:
        raise ValueError(f"unknown benchmark entries {unknown}; choose from {list(SPECS)}")
    checkpoint = checkpoint or (lambda out: None)
    n, steps = prof["table_images"], prof["sample_steps"]
    model = model or load_model("tiny")
    judge = judge or load_classifier(device=model.device, model=model)
    cs = concept_set(model)
    erased, names = list(cs.erase), list(cs.evaluate)
    t_start = time.time()
    original = heldout_acc(model, judge, [], names, n, steps)
    out = dict(profile=prof["name"], model=model.name, images_per_concept=n, sample_steps=steps,
               original={c: a for c, (a, _) in original.items()}, goals=GOALS, entries={},
               heldout={c: len(caption_split(model, c)[1]) for c in names})
    first = {}
    for key in entries:
        ds, secs, cpu = erase_for_bench(model, key, erased, progress)
        e = evaluate_entry(model, judge, ds, erased, n, steps, out["original"])
        e["summary"].update(seconds_per_concept=round(secs / len(ds), 2), cpu_seconds_per_concept=round(cpu / len(ds), 2))
        e["steps"] = [d.info.get("steps") for d in ds]
        out["entries"][key] = e
        if key in ("sepme1", "sepme1_concept"):
            first["today" if key == "sepme1" else "concept"] = (ds, secs, cpu)
        checkpoint(out)
    out["timing"] = timing(model, erased, repeats or (3 if prof["name"] == "full" else 1), progress, first)
    checkpoint(out)
    if curve:
        out["curve_concept"] = erased[0]
        out["curve"] = tradeoff(model, judge, erased[0], CURVE[prof["name"]], n, steps, erased, progress)
    out["seconds"] = round(time.time() - t_start, 1)
    out["markdown"] = markdown(out)
    return out
