"""Benchmarks that print numbers: ``python -m sepme_lib.bench {world,quality,sepme,relatives,widgets}``.

* ``world``     -- renders per second of the world (one core).
* ``quality``   -- the original model's classifier ACC per style and shape (the "original" column of every
  table); ``--images-per-concept N``.
* ``sepme``     -- the paper's Tables 1-5 (and 6 in the full profile) on the bundled world.
* ``passes``    -- seconds per erasure step with and without the skipped empty-prompt pass.
* ``relatives`` -- SepME beside its relatives (``relatives.relatives_benchmark``).
* ``widgets``   -- refresh time of the interactive grid (``widgets.benchmark``).
* ``deltas``    -- trains SepME_1 on the three styles with the default settings and writes the bundled
  increments ``data/deltas/sepme1_<style>.safetensors`` (``sepme.bundled_deltas``).

``--json`` prints one JSON object instead of markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from .deltas import edited_weights

from . import config, core, evaluate, sepme, world
from .classifier import load_classifier
from .model import load_model

ERASE_STYLES = ("striped", "checkered", "dotted")  # the paper's Van Gogh / Picasso / Cezanne analogue
RESULTS = config.DATA / "results"  # committed full-profile runs: <kind>_full.json


def load_or_run(kind: str, profile: str, compute, recompute: bool = False):
    """Notebook 07's rule: show the committed full-profile results ``data/results/<kind>_full.json`` (written by
    ``python -m sepme_lib.bench <kind> --profile full --save``); compute live in the given profile only when
    ``recompute`` is set (``RECOMPUTE=1``) or that file is absent. Recomputing the full tables takes about an hour
    on 2 CPU cores, which is why ``make course`` reads them by default."""
    path = RESULTS / f"{kind}_full.json"
    if not recompute and path.exists():
        out = json.loads(path.read_text())
        state = "" if out.get("complete", True) else " (PARTIAL: that run was stopped before its end)"
        print(f"showing the committed full-profile results in {path.relative_to(config.ROOT)}{state}; "
              "RECOMPUTE=1 recomputes them")
        return out
    print(f"computing {kind} in the {profile} profile ...")
    return compute()


def make_bundled_deltas(progress: bool = True) -> dict:
    """Train SepME_1 (separate, default :class:`sepme.Settings`) on ``ERASE_STYLES`` and save the increments where
    :func:`sepme.bundled_deltas` finds them; returns steps, seconds, leakage and L1 per increment."""
    model = load_model("tiny")
    concepts = core.make_concepts(model, ERASE_STYLES, n_ref=64)
    ds = sepme.sepme(model, concepts, "separate", sepme.Settings(), progress=progress)
    out = {}
    for d in ds:
        d.info.pop("history", None)  # the loss curves are notebook 03's; keep the file's metadata short
        path = d.save(sepme.BUNDLED_DIR / f"sepme1_{d.name}.safetensors")
        out[d.name] = dict(path=str(path.relative_to(config.ROOT)), steps=d.info["steps"], seconds=d.info["seconds"],
                           stop_reason=d.info.get("stop_reason"), l1=d.l1_norm(),
                           leakage_max=max(core.leakage(model, d.tensors, d.info["protected"]).values()))
    return out


def bench_widgets(repeats: int = 5) -> dict:
    """Refresh time of notebook 05's widget (4 images, ``widgets.WIDGET_STEPS`` DDIM steps) with the bundled
    increments; set ``SEPME_THREADS`` to compare thread counts."""
    from .widgets import benchmark_refresh

    config.set_threads()
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    return benchmark_refresh(model, clf, sepme.bundled_deltas(model), repeats=repeats)


def bench_world(n: int = 5000) -> dict:
    specs = world.random_specs(n, np.random.default_rng(0))
    t0 = time.time()
    world.render(specs, seed=0)
    dt = time.time() - t0
    return dict(images=n, seconds=round(dt, 3), images_per_second=round(n / dt, 1))


def bench_passes(steps: int = 20, batch: int = 4) -> dict:
    """Speed-up from skipping the edited model's empty-prompt pass when ``c_0`` is protected (DESIGN.md)."""
    model = load_model("tiny")
    c = core.make_concepts(model, ["striped"], n_ref=32)
    out = {}
    for skip in (False, True):
        s = sepme.Settings(cap=steps, batch=batch, tau=-1e9)
        g = sepme._decoupled_group(model, "striped", [""], s)
        t0 = time.time()
        sepme._train(model, c, [g], [0], s, skip_empty=skip, progress=False)
        out["skip" if skip else "no_skip"] = round((time.time() - t0) / steps, 4)
    out["speedup"] = round(out["no_skip"] / out["skip"], 2)
    out["unit"] = "seconds per step"
    return out


def bench_quality(images_per_concept: int = 50, steps=None, guidance=None, model=None, clf=None) -> dict:
    model = model or load_model("tiny")
    clf = clf or load_classifier(device=model.device)
    t0 = time.time()
    style = evaluate.acc_table(model, clf, world.STYLES, images_per_concept, steps=steps, guidance=guidance)
    shape = evaluate.acc_table(model, clf, world.SHAPES, images_per_concept, steps=steps, guidance=guidance)
    return dict(style=style, shape=shape, images_per_concept=images_per_concept,
                guidance=model.guidance if guidance is None else guidance, steps=steps or model.sample_steps,
                seconds=round(time.time() - t0, 1))


def _leakage_max(model, deltas) -> float:
    worst = 0.0
    for d in deltas:
        prot = d.info.get("protected")
        if prot:
            worst = max(worst, max(core.leakage(model, d.tensors, prot).values()))
    return worst


def bench_sepme(profile: str = "ci", settings: sepme.Settings | None = None, progress: bool = True,
                checkpoint=None) -> dict:
    """Tables 1-5 (+6 in ``full``) of the paper on the bundled world; see the issue for the JSON keys.

    ``checkpoint(out)`` is called after each section with the results so far (``--save`` writes them), so
    a long run that is stopped keeps what it finished."""
    checkpoint = checkpoint or (lambda out: None)
    prof = config.profile(profile)
    n, steps = prof["images_per_concept"], prof["sample_steps"]
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    s = settings or sepme.Settings(cap=prof["erase_steps"], batch=prof["batch"])
    evals = list(world.STYLES)
    t0 = time.time()
    concepts = core.make_concepts(model, ERASE_STYLES, n_ref=64)
    original = evaluate.acc_table(model, clf, evals, n, steps=steps)
    out = dict(profile=prof["name"], images_per_concept=n, settings=s.as_dict(), original=original, tables={})
    for key, mode in (("sepme1", "separate"), ("sepme2", "iterative")):
        t = time.time()
        ds = sepme.sepme(model, concepts, mode, s, progress=progress)
        train_s = time.time() - t
        tab = evaluate.combination_table(model, clf, ds, evals, n, steps=steps, original=original, progress=progress)
        out[key] = dict(tab["summary"], leakage_max=_leakage_max(model, ds),
                        seconds_per_concept=round(train_s / len(ds), 1),
                        steps=[d.info.get("steps") for d in ds], l1=[round(d.l1_norm(), 4) for d in ds])
        out["tables"][key] = tab["rows"]
        checkpoint(out)
    # Tables 1-2: G-CiRs alone, single concepts and all three at once
    g_rows = []
    for c in concepts:
        d = sepme.gcirs(model, [c], s, progress=progress)
        acc = evaluate.acc_table(model, clf, evals, n, edited_weights(model, [d]), steps=steps)
        g_rows.append(dict(erased=c.name, acc=acc, others=evaluate.others_mean(acc, [c.name]), l1=d.l1_norm()))
    d = sepme.gcirs(model, concepts, s, progress=progress)
    acc = evaluate.acc_table(model, clf, evals, n, edited_weights(model, [d]), steps=steps)
    g_rows.append(dict(erased="+".join(ERASE_STYLES), acc=acc, others=evaluate.others_mean(acc, ERASE_STYLES),
                       l1=d.l1_norm()))
    out["gcirs"] = g_rows
    checkpoint(out)
    if prof["name"] == "full":  # Table 6 (the stop threshold tau) and the L1 weight lambda, erasing striped
        runs = {}  # settings -> row, so that the default point is trained and evaluated once for both sweeps
        for key, name, values in (("tau_sweep", "tau", (0.002, 0.0, s.tau, -0.002)), ("lam_sweep", "lam", (s.lam, 5e-6))):
            sweep = []
            for v in dict.fromkeys(values):
                st = sepme.Settings(**dict(s.as_dict(), **{name: v}))
                k = tuple(sorted(st.as_dict().items()))
                if k not in runs:
                    ds = sepme.sepme(model, concepts[:1], "separate", st, progress=progress)
                    acc = evaluate.acc_table(model, clf, evals, n, edited_weights(model, ds), steps=steps)
                    runs[k] = dict(steps=ds[0].info["steps"], acc=acc, l1=ds[0].l1_norm(),
                                   others=evaluate.others_mean(acc, ERASE_STYLES[:1]))
                sweep.append({name: v, **runs[k]})
            out[key] = sweep
            checkpoint(out)
    out["seconds"] = round(time.time() - t0, 1)
    out["markdown"] = sepme_markdown(out, evals)
    return out


def sepme_markdown(out: dict, evals) -> str:
    parts = [f"Original model (ACC, {out['images_per_concept']} images per concept):\n",
             evaluate.markdown_table([out["original"]], list(evals))]
    for key, title in (("sepme1", "SepME_1 (separate)"), ("sepme2", "SepME_2 (iterative)")):
        if key not in out["tables"]:
            continue
        rows = [dict(erased="+".join(r["subset"]), **r["acc"]) for r in out["tables"][key]]
        parts += [f"\n\n{title}: ACC of every style under theta + sum of the listed increments "
                  "(Tables 3-5 layout)\n", evaluate.markdown_table(rows, ["erased"] + list(evals))]
        summ = {k: out[key][k] for k in ("leakage_max", "erased_acc_max", "others_ratio_min",
                                         "restoration_drift_max", "seconds_per_concept")}
        parts += ["\n\n" + evaluate.markdown_table([summ], list(summ))]
    if "gcirs" in out:
        rows = [dict(erased=r["erased"], others=r["others"], l1=r["l1"], **r["acc"]) for r in out["gcirs"]]
        parts += ["\n\nG-CiRs (Tables 1-2 layout)\n",
                  evaluate.markdown_table(rows, ["erased"] + list(evals) + ["others", "l1"])]
    if not out.get("complete", True):
        parts += ["\n\n(partial results: the run was stopped before its remaining sections)"]
    for key, name in (("tau_sweep", "tau"), ("lam_sweep", "lam")):
        if key in out:
            rows = [dict({name: r[name]}, steps=r["steps"], others=r["others"], l1=r["l1"], **r["acc"]) for r in out[key]]
            parts += [f"\n\n{name} sweep, SepME_1 erasing striped alone (Table 6 layout)\n",
                      evaluate.markdown_table(rows, [name, "steps"] + list(evals) + ["others", "l1"])]
    return "".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["world", "quality", "sepme", "passes", "relatives", "widgets", "deltas"])
    ap.add_argument("--profile", default=None, help="ci or full (default: $PROFILE, else full)")
    ap.add_argument("--images-per-concept", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", action="store_true", help="also write data/results/<what>_<profile>.json")
    ap.add_argument("--methods", default=None,
                    help="relatives only: comma-separated subset of methods; with --save they replace their rows in "
                         "an existing results file and the other methods' rows are kept")
    args = ap.parse_args(argv)
    prof = config.profile(args.profile)["name"]
    if args.what == "world":
        res = bench_world()
    elif args.what == "quality":
        res = bench_quality(args.images_per_concept, args.steps, args.guidance)
    elif args.what == "sepme":
        def save_partial(out):
            if args.save:
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / f"sepme_{prof}.json").write_text(json.dumps(dict(out, complete=False), indent=1, default=float))
        res = bench_sepme(prof, checkpoint=save_partial)
        res["complete"] = True
    elif args.what == "passes":
        res = bench_passes()
    elif args.what == "deltas":
        res = make_bundled_deltas()
    elif args.what == "relatives":
        from .relatives import relatives_benchmark, relatives_markdown
        methods = args.methods.split(",") if args.methods else None
        res = relatives_benchmark(prof, methods=methods)
        old_path = RESULTS / f"relatives_{prof}.json"
        if args.save and methods and old_path.exists():  # merge: the new rows replace theirs, the rest are kept
            old = json.loads(old_path.read_text())
            if old.get("images_per_concept") != res["images_per_concept"]:
                raise SystemExit(f"{old_path} has {old.get('images_per_concept')} images per concept, this run "
                                 f"{res['images_per_concept']}: rerun all methods instead of merging")
            merged = dict(old["methods"], **res["methods"])
            res["methods"] = {m: merged[m] for m in list(old["methods"]) + [m for m in res["methods"] if m not in old["methods"]]}
            res["total_seconds"] = None  # no longer one run
            res["markdown"] = relatives_markdown(res)
    else:
        res = bench_widgets()
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.what}_{prof}.json").write_text(json.dumps(res, indent=1, default=float))
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1, default=float))
    elif "markdown" in res:
        print(res["markdown"])
    elif args.what == "quality":
        print(f"guidance {res['guidance']}, {res['steps']} DDIM steps, {res['images_per_concept']} images per concept")
        print(evaluate.markdown_table([res["style"]], list(res["style"])))
        print()
        print(evaluate.markdown_table([res["shape"]], list(res["shape"])))
        print(f"\n{res['seconds']} s")
    else:
        print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
