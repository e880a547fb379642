"""Erased or only hidden? Every method of the library under the three attacks of :mod:`attacks`, per erased style
(``python -m sepme_lib.bench robustness``; notebook 09).

For each method (``methods.METHODS`` with their bundled-model defaults, plus SepME with concept-level protection and
the robust SepME of ``sepme.harden``) and each erased style, one row per attack with the keys of :data:`ROW_KEYS`:

* ``attack_acc`` -- the judge's ACC of the erased style on images the edited model draws from the attack's
  conditions (attack success; the evaluation captions and seeds of ``acc_table``);
* ``erased_acc`` -- ACC on the plain evaluation prompts; ``others_ratio`` -- the smallest over the style, colour and
  shape heads of (mean over the other styles under the edit) / (the same on the original model);
* ``heldout_protected_kv`` -- the largest key/value change on held-out captions of the other erased styles
  (``separability.kv_metrics``); ``certified`` -- the largest change on the prompts the increment protects (SepME
  only; ``None`` for methods without a certificate); ``cpu_s_per_concept`` -- CPU seconds of the erasure per concept;
* beside them (SepME variants): ``span_share`` -- the mean share of the attack's conditions inside the span of the
  protected rows (``attacks.span_share``), and ``span_acc`` -- the original model's ACC from that part alone.

SepME variants erase the three styles in one call (one increment each, the paper's setting) and each increment is
attacked alone; every other method erases each style alone. ``restoration_drift`` (SepME variants): the largest
change of another erased style's ACC under one increment, against the original model.

:func:`tradeoff` (``bench robustness --tradeoff``) measures robust SepME's rounds x inversion steps per round
(:data:`TRADEOFF`), notebook 09's curve.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from . import attacks, config, families, methods, report
from .classifier import load_classifier
from .concepts import concept_set, make_concepts
from .evaluate import acc_heads
from .loading import load_model
from .separability import kv_metrics

ROW_KEYS = ("method", "concept", "attack", "attack_acc", "erased_acc", "others_ratio", "heldout_protected_kv",
            "certified", "cpu_s_per_concept")
STYLES = ("striped", "checkered", "dotted")
SEPME_VARIANTS = {"sepme": {}, "sepme_concept": "concept", "sepme_robust": "robust"}
# per profile: styles attacked, images per ACC, reference images, the attacks' budgets that differ from
# methods.ATTACK_BUDGETS and (ci) robust SepME's rounds
PROFILES = {"ci": dict(styles=STYLES[:1], n=6, n_ref=16, budgets={"inversion": dict(steps=40),
                                                                  "prompt_search": dict(tokens=1, candidates=24)},
                       robust=dict(rounds=1, inversion_steps=10)),
            "full": dict(styles=STYLES, n=20, budgets={})}


def method_list() -> list:
    """``original`` (no edit: what each attack reaches on the original model), every method of ``methods.METHODS``
    (SepME as the paper's prompt-level default) and the two SepME variants."""
    return ["original"] + list(methods.METHODS) + ["sepme_concept", "sepme_robust"]


def _erase(model, method: str, cons: dict, styles, prof: dict, progress: bool):
    """``{style: delta list}`` and CPU seconds per concept."""
    c0 = time.process_time()
    if method in SEPME_VARIANTS:
        spec = SEPME_VARIANTS[method]
        extra = methods.concept_level(model) if spec in ("concept", "robust") else dict(spec)
        if spec == "robust":  # robust SepME: concept-level protection + rounds of attack (methods.ROBUST)
            extra["robust"] = prof.get("robust", True)  # ci: one short round (plumbing)
        extra.update(methods.profile_settings("sepme", prof))  # ci: a few steps (plumbing); full: none
        ds = methods.erase(model, [cons[s] for s in styles], method="sepme", progress=progress, **extra)
        out = {d.name: [d] for d in ds}
    elif method == "original":  # no edit: each attack's ceiling
        out = {s: [] for s in styles}
    else:
        over = methods.profile_settings(method, prof)
        out = {s: methods.erase(model, [cons[s]], method=method, progress=progress, **over) for s in styles}
    return out, (time.process_time() - c0) / len(styles)


def others_ratio(heads: dict, original: dict, erased) -> float:
    """min over the style/colour/shape heads of mean(head | others, edited) / mean(head | others, original)."""
    others = [c for c in heads if c not in set(erased)]
    ratios = []
    for h in ("acc", "colour", "shape"):
        if all(h in heads[c] for c in others):
            base = np.mean([original[c][h] for c in others])
            ratios.append(float(np.mean([heads[c][h] for c in others]) / max(base, 1e-9)))
    return min(ratios)


def benchmark(profile: str = "ci", method_names=None, progress: bool = False, model=None, judge=None, previous=None,
              checkpoint=None) -> dict:
    """The robustness table (module docstring) in ``profile`` (``ci``: striped, small budgets; ``full``: the three
    styles, the budgets of ``methods.ATTACK_BUDGETS``). ``previous``: an earlier result of the same profile whose
    methods are kept and not rerun; ``checkpoint(out)``: called after each method with the partial result."""
    prof = dict(config.profile(profile := config.bench_profile(profile)), **PROFILES[profile])
    names = method_list() if method_names is None else list(method_names)
    unknown = [m for m in names if m not in method_list()]
    if unknown:
        raise methods.MethodError(f"unknown methods {unknown}; choose from {method_list()}")
    model = model or load_model("tiny")
    judge = judge or load_classifier(model=model)
    n, steps, styles = prof["n"], prof["sample_steps"], list(prof["styles"])
    budgets = {a: dict(methods.ATTACK_BUDGETS[families.settings_key(model)][a], **prof["budgets"].get(a, {})) for a in attacks.NAMES}
    evals = list(concept_set(model).evaluate)
    t_start = time.time()
    cons = {c.name: c for c in make_concepts(model, STYLES, n_ref=prof["n_ref"])}
    original = acc_heads(model, judge, evals, n, steps=steps)
    if previous is not None and previous.get("profile") != profile:
        raise config.BadValue(f"the saved results are of profile {previous.get('profile')!r}, not {profile!r}")
    kept = {r["method"] for r in previous["rows"]} & set(names) if previous else set()
    rows = [r for r in previous["rows"] if r["method"] in kept] if previous else []
    drift = {k: v for k, v in (previous or {}).get("restoration_drift", {}).items() if k in kept}
    for m in [m for m in names if m not in kept]:
        # SepME variants always erase the three styles together (each increment protects the others' prompts)
        by_style, cpu = _erase(model, m, cons, STYLES if m in SEPME_VARIANTS else styles, prof, progress)
        drift_m = []
        for s in styles:
            ds = by_style[s]
            heads = acc_heads(model, judge, evals, n, deltas=ds, steps=steps)
            drift_m += [abs(heads[o]["acc"] - original[o]["acc"]) for o in STYLES if o != s]
            kv = kv_metrics(model, ds[0], s, STYLES) if ds else {}
            common = dict(method=m, concept=s, erased_acc=heads[s]["acc"], others_ratio=others_ratio(heads, original, [s]),
                          heldout_protected_kv=kv.get("heldout_protected_kv_max"),
                          certified=kv["certified_leakage_max"] if m in SEPME_VARIANTS else None,
                          cpu_s_per_concept=round(cpu, 2))
            for a in attacks.NAMES:
                r = attacks.run(model, judge, ds, cons[s], a, n=n, sample_steps=steps, **budgets[a])
                row = dict(common, attack=a, attack_acc=r["acc"], budget=r["budget"], attack_seconds=r["seconds"],
                           example=r["prompts"][0], span_share=None, span_acc=None)
                if m in SEPME_VARIANTS:
                    protected = ds[0].info["protected"]
                    row["span_share"] = float(attacks.span_share(model, r["embeddings"], protected).mean())
                    row["span_acc"] = attacks.from_span(model, judge, r["embeddings"], protected, s, steps=steps)
                rows.append(row)
                if progress:
                    print(f"{m:14s} {s:10s} {a:14s} attack {row['attack_acc']:.2f} erased {row['erased_acc']:.2f} "
                          f"others {row['others_ratio']:.2f}", file=sys.stderr, flush=True)
        if m in SEPME_VARIANTS:
            drift[m] = max(drift_m)
        if checkpoint is not None:
            checkpoint(_result(profile, n, steps, styles, budgets, rows, drift, original, evals, t_start))
    return _result(profile, n, steps, styles, budgets, rows, drift, original, evals, t_start)


def _result(profile, n, steps, styles, budgets, rows, drift, original, evals, t_start) -> dict:
    out = dict(profile=profile, images_per_concept=n, sample_steps=steps, styles=styles, budgets=budgets, rows=rows,
               restoration_drift=drift, original={c: original[c]["acc"] for c in evals},
               total_seconds=round(time.time() - t_start, 1))
    out["markdown"] = markdown(out)
    return out


def markdown(out: dict) -> str:
    """One line per method: attack ACC per attack (worst over the styles), beside erased ACC and the others ratio."""
    methods_ = list(dict.fromkeys(r["method"] for r in out["rows"]))

    def worst(m, key, attack=None, fn=max):
        vals = [r[key] for r in out["rows"] if r["method"] == m and (attack is None or r["attack"] == attack)
                and r[key] is not None]
        return fn(vals) if vals else None

    rows = []
    for m in methods_:
        rows.append(dict(method=m, **{a: worst(m, "attack_acc", a) for a in attacks.NAMES},
                         erased=worst(m, "erased_acc"), others=worst(m, "others_ratio", fn=min),
                         heldout_kv=worst(m, "heldout_protected_kv"), certified=worst(m, "certified"),
                         cpu_s=worst(m, "cpu_s_per_concept"), drift=out["restoration_drift"].get(m),
                         span_share=worst(m, "span_share", "derived", min), span_acc=worst(m, "span_acc", "derived", min)))
    cols = (["method"] + list(attacks.NAMES) + ["erased", "others", "heldout_kv", "certified", "drift", "cpu_s",
                                                "span_share", "span_acc"])
    note = (f"Worst over {', '.join(out['styles'])} ({out['images_per_concept']} images per ACC, "
            f"{out['sample_steps']} DDIM steps); attack columns: ACC of the erased style from the attack's conditions; "
            f"budgets: " + "; ".join(f"{a}: {b}" for a, b in out["budgets"].items()) + ". `original`: no edit (each "
            "attack's ceiling); `span_share` / `span_acc` (SepME variants, derived embedding): the share of c' inside "
            "the protected span and the original model's ACC from that part alone (smallest over the styles).")
    return report.markdown_table(rows, cols) + "\n\n" + note


# robust SepME's trade-off: per protection ("concept": the benchmark's sepme_robust; "prompt": the paper's SepME_1),
# rounds x the inversion budget of each round (0 rounds = no robust training)
TRADEOFF = {"ci": dict(n=4, n_ref=16, series={"concept": dict(rounds=(0, 1), budgets=(5,))}),
            "full": dict(n=20, series={"concept": dict(rounds=(0, 1, 2, 3), budgets=(100, 300)),
                                       "prompt": dict(rounds=(0, 1), budgets=(100,))})}


def tradeoff(profile: str = "full", series=None, model=None, judge=None, progress: bool = False,
             checkpoint=None) -> dict:
    """Robust SepME's rounds x per-round inversion budget (``python -m sepme_lib.bench robustness --tradeoff``): for
    each point of each series (``series``: ``{protection: dict(rounds=..., budgets=...)}``, default
    ``TRADEOFF[profile]``), SepME with that protection (``"concept"``: ``methods.concept_level``; ``"prompt"``: the
    paper's SepME_1) erases the three styles together with that many rounds, and each increment is attacked by the
    evaluation inversion (``methods.ATTACK_BUDGETS``) and the derived embedding. One row per point and style:
    ``inversion_acc``, ``derived_acc``, ``erased_acc``, ``certified``, ``cpu_s_per_concept``. A profile's ``settings``
    (none by default) override SepME's settings at every point."""
    prof = dict(config.profile(profile := config.bench_profile(profile)), **TRADEOFF[profile])
    series = prof["series"] if series is None else series
    if set(series) - {"concept", "prompt"}:
        raise config.BadValue(f"tradeoff series are keyed by protection 'concept' or 'prompt', got {list(series)}")
    model = model or load_model("tiny")
    judge = judge or load_classifier(model=model)
    n, steps = prof["n"], prof["sample_steps"]
    evals = {a: dict(methods.ATTACK_BUDGETS[families.settings_key(model)][a], **PROFILES[profile]["budgets"].get(a, {}))
             for a in ("derived", "inversion")}
    cons = [c for c in make_concepts(model, STYLES, n_ref=prof["n_ref"])]
    points = [(prot, 0, None) for prot, sp in series.items() if 0 in sp["rounds"]]
    points += [(prot, r, b) for prot, sp in series.items() for b in sp["budgets"] for r in sp["rounds"] if r > 0]
    rows, t_start = [], time.time()
    for prot, k, budget in points:
        extra = dict(methods.concept_level(model) if prot == "concept" else {}, **methods.profile_settings("sepme", prof))
        extra.update(prof.get("settings", {}))  # SepME overrides of a profile (a test's step cap)
        if k:
            extra["robust"] = dict(methods.ROBUST[families.settings_key(model)], rounds=k, inversion_steps=budget)
        c0 = time.process_time()
        ds = methods.erase(model, cons, method="sepme", progress=progress, **extra)
        cpu = (time.process_time() - c0) / len(cons)
        for d, con in zip(ds, cons):
            row = dict(protection=prot, rounds=k, budget=budget, concept=con.name, cpu_s_per_concept=round(cpu, 2),
                       erased_acc=acc_heads(model, judge, [con.name], n, deltas=[d], steps=steps)[con.name]["acc"],
                       certified=kv_metrics(model, d, con.name, STYLES)["certified_leakage_max"])
            for a, b in evals.items():
                row[f"{a}_acc"] = attacks.run(model, judge, [d], con, a, n=n, sample_steps=steps, **b)["acc"]
            rows.append(row)
            if progress:
                print(f"tradeoff {prot}-level rounds {k} budget {budget} {con.name}: inversion "
                      f"{row['inversion_acc']:.2f} derived {row['derived_acc']:.2f} erased {row['erased_acc']:.2f} "
                      f"cpu {cpu:.0f} s", file=sys.stderr, flush=True)
        out = dict(profile=profile, images_per_concept=n, sample_steps=steps, eval_budgets=evals, rows=rows,
                   total_seconds=round(time.time() - t_start, 1))
        if checkpoint is not None:
            checkpoint(out)
    out["markdown"] = tradeoff_markdown(out)
    return out


def tradeoff_points(out: dict) -> list[dict]:
    """One record per (rounds, budget) of :func:`tradeoff`'s rows: inversion ACC mean and worst over the styles,
    derived and erased worst, certified leakage and CPU seconds per concept (notebook 09's curve and table)."""
    table = []
    for key in dict.fromkeys((r["protection"], r["rounds"], r["budget"]) for r in out["rows"]):
        rs = [r for r in out["rows"] if (r["protection"], r["rounds"], r["budget"]) == key]
        inv = [r["inversion_acc"] for r in rs]
        table.append(dict(protection=key[0], rounds=key[1], budget=key[2] or "-", inversion_mean=float(np.mean(inv)),
                          inversion_worst=max(inv), derived_worst=max(r["derived_acc"] for r in rs),
                          erased_worst=max(r["erased_acc"] for r in rs),
                          certified=max(r["certified"] for r in rs), cpu_s=max(r["cpu_s_per_concept"] for r in rs)))
    return table


def tradeoff_curves(out: dict) -> dict:
    """``{"<protection>-level, <budget> steps/round": (rounds, mean inversion ACC per rounds)}``, each curve starting
    at its protection's 0-round point."""
    points = sorted(tradeoff_points(out), key=lambda p: p["rounds"])
    curves = {}
    for prot in dict.fromkeys(p["protection"] for p in points):
        zero = [p for p in points if p["protection"] == prot and p["rounds"] == 0]
        for b in dict.fromkeys(p["budget"] for p in points if p["protection"] == prot and p["rounds"] > 0):
            ps = zero + [p for p in points if p["protection"] == prot and p["budget"] == b and p["rounds"] > 0]
            curves[f"{prot}-level, {b} steps/round"] = ([p["rounds"] for p in ps], [p["inversion_mean"] for p in ps])
    return curves


def tradeoff_markdown(out: dict) -> str:
    """:func:`tradeoff_points` as a table, with the evaluation's settings."""
    table = tradeoff_points(out)
    note = (f"SepME (concept- or prompt-level protection) + rounds of textual inversion (`budget`: inversion steps per round), the three styles "
            f"erased together; evaluation: {out['images_per_concept']} images per ACC, attacks {out['eval_budgets']}.")
    return report.markdown_table(table, list(table[0])) + "\n\n" + note
