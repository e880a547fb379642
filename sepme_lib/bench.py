"""Benchmarks that print numbers: ``python -m sepme_lib.bench <what> [options]`` (``--help`` per command).

* ``world``     -- renders per second of the world (one core).
* ``quality``   -- the original model's classifier ACC per style and shape (the "original" column of every table).
* ``sepme``     -- the paper's Tables 1-5 (and 6 in the full profile) on the bundled world.
* ``joint``     -- Table 3: SepME's joint mode (the three increments trained in one loop), every combination.
* ``relatives`` -- SepME beside its relatives (Tables 1-2 layout, distances, red-team ACC).
* ``passes``    -- seconds per erasure step with and without the skipped empty-prompt pass.
* ``widgets``   -- refresh time of the interactive grid (``widgets.benchmark_refresh``).
* ``deltas``    -- trains SepME_1 on the three styles with the default settings and writes the bundled
  increments ``data/deltas/sepme1_<style>.safetensors`` (``sepme.bundled_deltas``).
* ``separability`` -- held-out (concept-level) separability of SepME, SPEED, UCE, MACE; speed; trade-off curve
  (``separability.benchmark``, notebook 08).
* ``gpu-path`` -- time and peak memory of every SD operation of the notebooks, and each notebook's estimate
  (``gpupath``; ``--save`` writes ``data/results/gpu_path_<cpu|cuda>.json``).
* ``capacity`` -- the null space left at SD 1.4's and SDXL's dimensions (``nullspace.capacity_rows``, notebook 03).
* ``robustness`` -- every method under three attacks (``robustness.benchmark``, notebook 09); ``--save`` resumes;
  ``--tradeoff``: robust SepME's rounds x inversion budget (``robustness.tradeoff``).

``--json`` prints one JSON object instead of markdown; ``--save`` writes ``data/results/<what>_<profile>.json``.
Every number comes from the public API (``erase``, ``acc_table``, ``combine``), as in the notebooks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from . import config, families, gcirs, gpupath, methods, nullspace, report, robustness, separability, sepme, world
from .classifier import accuracy, load_classifier
from .concepts import make_concepts
from .evaluate import acc_table, combination_table, eval_prompts, generate, others_mean, redteam_probe
from .loading import load_model
from .perceptual import perceptual_distance
from .widgets import benchmark_refresh

ERASE_STYLES = ("striped", "checkered", "dotted")  # the paper's Van Gogh / Cezanne / Picasso analogue


def load_or_run(kind: str, profile: str, compute, recompute: bool = False):
    """Notebook 07's rule: show the committed full-profile results ``data/results/<kind>_full.json`` (written by
    ``python -m sepme_lib.bench <kind> --profile full --save``); compute live in the given profile only when
    ``recompute`` is set (``RECOMPUTE=1``) or that file is absent."""
    path = config.RESULTS / f"{kind}_full.json"
    if not recompute and path.exists():
        out = json.loads(path.read_text())
        state = "" if out.get("complete", True) else " (PARTIAL: that run was stopped before its end)"
        print(f"showing the committed full-profile results in data/results/{path.name}{state}; RECOMPUTE=1 "
              "recomputes them")
        return out
    print(f"computing {kind} in the {profile} profile ...")
    return compute()


def make_bundled_deltas(progress: bool = True) -> dict:
    """Train SepME_1 (separate, the bundled model's defaults) on ``ERASE_STYLES`` and save the increments where
    :func:`sepme.bundled_deltas` finds them; returns steps, seconds, leakage and L1 per increment."""
    model = load_model("tiny")
    ds = methods.erase(model, list(ERASE_STYLES), method="sepme", mode="separate", progress=progress)
    out = {}
    for d in ds:
        d.info.pop("history", None)  # the loss curves are notebook 03's; keep the file's metadata short
        path = d.save(config.BUNDLED_DELTAS / f"sepme1_{d.name}.safetensors", overwrite=True)
        out[d.name] = dict(path=path.name, steps=d.info["steps"], seconds=d.info["seconds"],
                           stop_reason=d.info.get("stop_reason"), l1=d.l1_norm(),
                           leakage_max=max(nullspace.leakage(model, d, d.info["protected"]).values()))
    return out


def bench_widgets(repeats: int = 5) -> dict:
    """Refresh time of notebook 05's widget with the bundled increments (set ``SEPME_THREADS`` to compare)."""
    model = load_model("tiny")
    return benchmark_refresh(model, load_classifier(device=model.device), sepme.bundled_deltas(model), repeats=repeats)


def bench_world(n: int = 5000) -> dict:
    specs = world.random_specs(n, np.random.default_rng(0))
    t0 = time.time()
    world.render(specs, seed=0)
    dt = time.time() - t0
    return dict(images=n, seconds=round(dt, 3), images_per_second=round(n / dt, 1))


def bench_passes(steps: int = 20) -> dict:
    """Speed-up from skipping the edited model's empty-prompt pass when ``c_0`` is protected."""
    model = load_model("tiny")
    c = make_concepts(model, ["striped"], n_ref=32)
    out = {}
    for skip in (False, True):
        s = gcirs.Settings(**dict(methods.settings("sepme", model), cap=steps, tau=-1e9))
        inc = nullspace.decoupled_increment(model, "striped", [""], s.beta, s.min_null_dim, s.lr, s.tau)
        t0 = time.time()
        gcirs.train(model, c, [inc], [0], s, skip_empty=skip, progress=False)
        out["skip" if skip else "no_skip"] = round((time.time() - t0) / steps, 4)
    out["speedup"] = round(out["no_skip"] / out["skip"], 2)
    out["unit"] = "seconds per step"
    return out


def bench_quality(images_per_concept: int = 50, steps=None, guidance=None) -> dict:
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    t0 = time.time()
    style = acc_table(model, clf, world.STYLES, images_per_concept, steps=steps, guidance=guidance)
    shape = acc_table(model, clf, world.SHAPES, images_per_concept, steps=steps, guidance=guidance)
    return dict(style=style, shape=shape, images_per_concept=images_per_concept,
                guidance=model.guidance if guidance is None else guidance, steps=steps or model.sample_steps,
                seconds=round(time.time() - t0, 1))


def _leakage_max(model, deltas) -> float:
    return max((max(nullspace.leakage(model, d, d.info["protected"]).values()) for d in deltas
                if d.info.get("protected")), default=0.0)


SEPME_SECTIONS = {"sepme1": "separate", "sepme2": "iterative"}


def bench_sepme(profile: str = "ci", progress: bool = True, checkpoint=None, sections=None, previous=None) -> dict:
    """The paper's Tables 1-5 (+6 in ``full``) on the bundled world, every number from ``erase`` and ``acc_table``.

    ``checkpoint(out)`` is called after each section with the results so far (``--save`` writes them). ``sections``
    (a subset of :data:`SEPME_SECTIONS`) with ``previous`` (an earlier result of the same profile) recomputes only those
    sections on the earlier run's original ACC and keeps the rest, recording which sections were rerun and when."""
    checkpoint = checkpoint or (lambda out: None)
    prof = config.profile(config.bench_profile(profile))
    n, steps = prof["images_per_concept"], prof["sample_steps"]
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    evals = list(world.STYLES)
    t0 = time.time()
    concepts = make_concepts(model, ERASE_STYLES, n_ref=64)
    if sections:
        out = dict(previous, tau_by_mode={m: methods.mode_tau(model, m, len(concepts)) for m in SEPME_SECTIONS.values()})
        out.setdefault("rerun", {})
        for key in sections:
            _sepme_section(out, key, model, clf, concepts, evals, n, steps, progress)
            out["rerun"][key] = dict(command=f"python -m sepme_lib.bench sepme --profile {prof['name']} --sections "
                                             f"{','.join(sections)} --save", version=config.VERSION,
                                     settings=methods.settings("sepme", model), date=time.strftime("%Y-%m-%d"))
            checkpoint(out)
        out["markdown"] = report.sepme_markdown(out)
        return out
    original = acc_table(model, clf, evals, n, steps=steps)
    out = dict(profile=prof["name"], images_per_concept=n, sample_steps=steps,
               settings=methods.settings("sepme", model), original=original, tables={},
               tau_by_mode={m: methods.mode_tau(model, m, len(concepts)) for m in ("separate", "iterative")})
    # Tables 1-2: G-CiRs alone, single concepts and all three at once
    g_rows = []
    for job in [[c] for c in concepts] + [concepts]:
        d = methods.erase(model, job, method="gcirs", progress=progress)
        names = [c.name for c in job]
        acc = acc_table(model, clf, evals, n, d, steps=steps)
        g_rows.append(dict(erased="+".join(names), acc=acc, others=others_mean(acc, names), l1=d[0].l1_norm(),
                           steps=d[0].info["steps"]))
    out["gcirs"] = g_rows
    checkpoint(out)
    for key in SEPME_SECTIONS:
        _sepme_section(out, key, model, clf, concepts, evals, n, steps, progress)
        checkpoint(out)
    if prof["name"] == "full":
        out.update(sweeps(model, clf, concepts[:1], evals, n, steps, progress))
        checkpoint(out)
    out["seconds"] = round(time.time() - t0, 1)
    out["markdown"] = report.sepme_markdown(out)
    return out


def _sepme_section(out, key, model, clf, concepts, evals, n, steps, progress) -> None:
    """Train ``SEPME_SECTIONS[key]``'s mode at its stop thresholds (``methods.mode_tau``) and judge every combination."""
    mode = SEPME_SECTIONS[key]
    t = time.time()
    ds = methods.erase(model, concepts, method="sepme", mode=mode, progress=progress,
                       tau=methods.mode_tau(model, mode, len(concepts)))
    train_s = time.time() - t
    tab = combination_table(model, clf, ds, evals, n, steps=steps, original=out["original"], progress=progress)
    out[key] = dict(tab["summary"], leakage_max=_leakage_max(model, ds), seconds_per_concept=round(train_s / len(ds), 1),
                    steps=[d.info.get("steps") for d in ds], l1=[round(d.l1_norm(), 4) for d in ds],
                    stop_reason=[d.info.get("stop_reason") for d in ds])
    out["tables"][key] = tab["rows"]


def bench_joint(profile: str = "full", progress: bool = True) -> dict:
    """The paper's Table 3 on the bundled world (notebook 07): SepME's joint mode, the increments of ``ERASE_STYLES``
    trained together in one loop with the bundled model's defaults (``methods.DEFAULTS``), then every combination
    ``theta + sum_{i in S} dTheta_i`` judged on every style with the profile's ``images_per_concept`` images
    (``evaluate.combination_table``; its rows carry the judge's heads where the library gives them)."""
    prof = config.profile(config.bench_profile(profile), "tiny")
    n, steps = prof["images_per_concept"], prof["sample_steps"]
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    t0 = time.time()
    tau = methods.mode_tau(model, "joint", len(ERASE_STYLES))  # twice separate mode's (methods.TAU_FACTORS)
    ds = methods.erase(model, make_concepts(model, ERASE_STYLES, n_ref=prof["n_ref"]), method="sepme", mode="joint",
                       progress=progress, tau=tau)
    train_s = time.time() - t0
    tab = combination_table(model, clf, ds, list(world.STYLES), n, steps=steps, progress=progress)
    out = dict(command=f"python -m sepme_lib.bench joint --profile {prof['name']} --save", version=config.VERSION,
               profile=prof["name"], images_per_concept=n, sample_steps=steps, n_ref=prof["n_ref"], mode="joint",
               settings=methods.settings("sepme", model, tau=tau), torch_threads=torch.get_num_threads(),
               original=tab["original"], rows=tab["rows"],
               summary=dict(tab["summary"], leakage_max=_leakage_max(model, ds)),
               steps=[d.info.get("steps") for d in ds], stop_reason=[d.info.get("stop_reason") for d in ds],
               l1=[round(d.l1_norm(), 4) for d in ds], train_seconds=round(train_s, 1),
               seconds=round(time.time() - t0, 1))
    rows = [dict(erased="+".join(r["subset"]), **r["acc"]) for r in out["rows"]]
    out["markdown"] = (f"SepME, joint mode ({n} images per style, {steps} DDIM steps): ACC of every style under theta "
                       "+ the listed increments (Table 3 layout)\n\n"
                       + report.markdown_table([dict(erased="-", **out["original"])] + rows,
                                               ["erased", *out["original"]]))
    return out


def sweeps(model, clf, concepts, evals, n: int, steps, progress: bool = True) -> dict:
    """Table 6 (the stop threshold tau) and the L1 weight lambda, erasing ``concepts`` (one) with SepME_1 in the paper's
    plain setting (``single="plain"``: ``A = {c_0}``): with the bundled model's single-concept default the 150-step
    warm-up ends below every tau of the sweep, so every tau would stop at the same step and the table would show
    nothing. Each point is trained and evaluated once (the default point serves both sweeps)."""
    s0 = methods.settings("sepme", model)
    runs, out = {}, dict(sweep_concept=concepts[0].name, sweep_setting="single='plain'")
    for key, name, values in (("tau_sweep", "tau", (0.002, 0.0, s0["tau"], -0.002)), ("lam_sweep", "lam", (s0["lam"], 5e-6))):
        sweep = []
        for v in dict.fromkeys(values):
            point = {"tau": s0["tau"], "lam": s0["lam"]}
            point[name] = v
            k = (point["tau"], point["lam"])
            if k not in runs:
                ds = methods.erase(model, concepts, method="sepme", single="plain", progress=progress, **point)
                acc = acc_table(model, clf, evals, n, ds, steps=steps)
                runs[k] = dict(steps=ds[0].info["steps"], acc=acc, l1=ds[0].l1_norm(),
                               others=others_mean(acc, [c.name for c in concepts]))
            sweep.append({name: v, **runs[k]})
        out[key] = sweep
    return out


def relatives_benchmark(profile: str = "ci", methods_=None, progress: bool = False) -> dict:
    """SepME and its relatives side by side on the bundled world (the paper's Tables 1-2 layout), notebooks 06-07.

    For every method: erase ``striped`` alone (``full``: each of striped, checkered, dotted alone) and the three
    together; evaluate ACC of every style (fixed seeds), the perceptual distance to the original model's images
    (erased concepts and others separately), ``||dtheta||_p`` (summed over a method's deltas), seconds per edit, and
    the red-team ACC of RECE's derived embedding on the erased concepts. Overrides per profile:
    ``methods.profile_settings``. Returns a JSON-able dict (``methods[m]`` with means and ``rows``; ``markdown``)."""
    prof = config.profile(config.bench_profile(profile))
    n, steps = prof["images_per_concept"], prof["sample_steps"]
    names = list(methods_ or methods.METHODS)
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:  # before loading anything
        raise methods.MethodError(f"unknown methods {unknown}; choose from {list(methods.METHODS)}")
    model = load_model("tiny")
    clf = load_classifier(device=model.device)
    evals = list(world.STYLES)
    t_start = time.time()
    cons = {c.name: c for c in make_concepts(model, ERASE_STYLES, n_ref=64)}
    seeds = [k for _ in evals for k in range(n)]
    prompts = [p for c in evals for p in eval_prompts(model, c, n)]  # the images acc_table would draw

    def acc_of(imgs):
        return {c: accuracy(clf, imgs[i * n:(i + 1) * n], "style", c) for i, c in enumerate(evals)}

    base_imgs = generate(model, prompts, seeds, steps=steps)
    original = acc_of(base_imgs)
    singles = list(ERASE_STYLES) if prof["name"] == "full" else list(ERASE_STYLES[:1])
    jobs = [[s] for s in singles] + [list(ERASE_STYLES)]
    metric = None
    out = dict(profile=prof["name"], images_per_concept=n, sample_steps=steps, original=original, methods={})
    for m in names:
        rows = []
        for job in jobs:
            t0 = time.time()
            ds = methods.erase(model, [cons[j] for j in job], method=m, progress=progress,
                               **methods.profile_settings(m, prof))
            secs = time.time() - t0
            imgs = generate(model, prompts, seeds, ds, steps=steps)
            acc, dist = acc_of(imgs), {}
            for i, c in enumerate(evals):
                dist[c], metric = perceptual_distance(imgs[i * n:(i + 1) * n], base_imgs[i * n:(i + 1) * n])
            red = [redteam_probe(model, clf, ds, c, n=n, steps=steps, with_prompt=False)["acc"] for c in job]
            others = [c for c in evals if c not in job]
            rows.append(dict(erased="+".join(job), acc=acc, erased_acc=float(np.mean([acc[c] for c in job])),
                             others_acc=others_mean(acc, job), perceptual_erased=float(np.mean([dist[c] for c in job])),
                             perceptual_others=float(np.mean([dist[c] for c in others])),
                             l1=float(sum(d.l1_norm() for d in ds)), seconds=round(secs, 3),
                             seconds_per_edit=round(secs / len(ds), 3), redteam_acc=float(np.mean(red))))
        out["methods"][m] = dict({k: float(np.mean([r[k] for r in rows])) for k in report.SUMMARY_KEYS}, rows=rows)
    out["perceptual_metric"] = metric
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["markdown"] = report.relatives_markdown(out)
    return out


def _merge_relatives(res: dict, old_path) -> dict:
    """``--methods`` with ``--save``: the new methods' rows replace theirs in the saved file; the others are kept."""
    old = json.loads(old_path.read_text())
    if old.get("images_per_concept") != res["images_per_concept"]:
        raise SystemExit(f"{old_path} has {old.get('images_per_concept')} images per concept, this run "
                         f"{res['images_per_concept']}: rerun all methods instead of merging")
    merged = dict(old["methods"], **res["methods"])
    order = list(old["methods"]) + [m for m in res["methods"] if m not in old["methods"]]
    res["methods"] = {m: merged[m] for m in order}
    res["total_seconds"] = None  # no longer one run
    res["markdown"] = report.relatives_markdown(res)
    return res


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sepme_lib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    common.add_argument("--save", action="store_true", help="also write data/results/<what>_<profile>.json")
    prof = argparse.ArgumentParser(add_help=False)
    prof.add_argument("--profile", choices=list(config.BENCH_PROFILES), default=None,
                      help="ci or full (default: $PROFILE, else full)")
    w = sub.add_parser("world", parents=[common], help="renders per second")
    w.add_argument("--images", type=config.positive_int, default=5000)
    q = sub.add_parser("quality", parents=[common], help="ACC of the original model per style and shape")
    q.add_argument("--images-per-concept", type=config.positive_int, default=50)
    q.add_argument("--steps", type=config.positive_int, default=None, help="DDIM steps (default: the model's)")
    q.add_argument("--guidance", type=float, default=None)
    se = sub.add_parser("sepme", parents=[common, prof], help="Tables 1-6 on the bundled world")
    se.add_argument("--sections", default=None, help="comma-separated subset of sepme1,sepme2: recompute only those "
                                                     "into the existing results file (the other sections are kept)")
    sub.add_parser("joint", parents=[common, prof], help="Table 3: SepME's joint mode, every combination")
    r = sub.add_parser("relatives", parents=[common, prof], help="SepME beside its relatives")
    r.add_argument("--methods", default=None, help="comma-separated subset of methods; with --save they replace their "
                                                   "rows in an existing results file and the other rows are kept")
    p = sub.add_parser("passes", parents=[common], help="seconds per step with/without the empty-prompt pass")
    p.add_argument("--steps", type=config.positive_int, default=20)
    g = sub.add_parser("widgets", parents=[common], help="refresh time of notebook 05's widget")
    g.add_argument("--repeats", type=config.positive_int, default=5)
    sub.add_parser("deltas", parents=[common], help="retrain the bundled SepME_1 increments in data/deltas/")
    sp = sub.add_parser("separability", parents=[common, prof], help="held-out separability, speed, trade-off curve")
    sp.add_argument("--entries", default=None, help=f"comma-separated subset of {', '.join(separability.SPECS)}")
    sp.add_argument("--no-curve", action="store_true", help="skip the trade-off curve")
    gp = sub.add_parser("gpu-path", parents=[common], help="time and peak memory of each SD operation (gpupath)")
    gp.add_argument("--model", required=True, help="a diffusers SD 1.x or SDXL folder, e.g. the full-size random SD "
                                                   "1.4 of `python -m sepme_lib.random_sd DIR --size full` (DIR/pipeline)")
    gp.add_argument("--device", default=None, help="cpu or cuda (default: config.get_device)")
    gp.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: config.default_dtype")
    gp.add_argument("--repeats", type=config.positive_int, default=3, help="timed runs after the warm-up")
    gp.add_argument("--ops", default=None, help=f"a comma-separated subset of {', '.join(gpupath.OPS)} (default: all)")
    gp.add_argument("--slow-s", type=float, default=60.0, help="an op whose warm-up takes longer is timed once")
    gp.add_argument("--steps", type=config.positive_int, default=3, help="DDIM steps timed (50 extrapolated)")
    gp.add_argument("--images", type=config.positive_int, default=None, help="images per batch (1 on a CPU, else 8)")
    gp.add_argument("--in-process", action="store_true", help="all ops in this process, not one subprocess each")
    sub.add_parser("capacity", parents=[common], help="null-space capacity at SD 1.4's and SDXL's dimensions")
    rb = sub.add_parser("robustness", parents=[common, prof], help="every method x attack (notebook 09)")
    rb.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(robustness.method_list())}")
    rb.add_argument("--tradeoff", action="store_true", help="robust SepME: rounds x inversion budget instead")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    prof = config.profile(getattr(args, "profile", None))["name"]
    path = config.RESULTS / f"{args.what}{'_tradeoff' if getattr(args, 'tradeoff', False) else ''}_{prof}.json"
    if args.what == "gpu-path":  # gpu_path_<device>.json for SD 1.x, gpu_path_<device>_sdxl.json for SDXL
        suffix = families.model_family(args.model).results_suffix
        path = config.RESULTS / f"gpu_path_{config.get_device(args.device).type}{suffix}.json"
    if args.what == "relatives" and args.methods:  # (robustness checks its own --methods)
        methods_ = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods_ if m not in methods.METHODS]
        if not methods_ or unknown:
            raise SystemExit(f"--methods: unknown or empty {unknown or args.methods!r}; choose from "
                             f"{', '.join(methods.METHODS)}")
    else:
        methods_ = None

    def save(res):
        config.RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=float))
        tmp.replace(path)

    if args.what == "world":
        res = bench_world(args.images)
    elif args.what == "quality":
        res = bench_quality(args.images_per_concept, args.steps, args.guidance)
    elif args.what == "sepme":
        sections = [x.strip() for x in args.sections.split(",") if x.strip()] if args.sections else None
        if sections is not None and (not sections or set(sections) - set(SEPME_SECTIONS) or not path.exists()):
            raise SystemExit(f"--sections: give some of {', '.join(SEPME_SECTIONS)} (got {args.sections!r}); they are "
                             f"recomputed into the existing {path} (run without --sections first)")
        previous = json.loads(path.read_text()) if sections else None
        res = bench_sepme(prof, checkpoint=(lambda out: save(dict(out, complete=False))) if args.save else None,
                          sections=sections, previous=previous)
        res["complete"] = True
    elif args.what == "joint":
        res = bench_joint(prof)
    elif args.what == "passes":
        res = bench_passes(args.steps)
    elif args.what == "deltas":
        res = make_bundled_deltas()
    elif args.what == "separability":
        entries = [e.strip() for e in args.entries.split(",") if e.strip()] if args.entries else None
        bad = [e for e in entries or [] if e not in separability.SPECS]
        if bad or entries == []:
            raise SystemExit(f"--entries: unknown or empty {bad or args.entries!r}; choose from "
                             f"{', '.join(separability.SPECS)}")
        res = separability.benchmark(prof, entries, curve=not args.no_curve,
                                     checkpoint=(lambda out: save(dict(out, complete=False))) if args.save else None)
        res["complete"] = True
    elif args.what == "gpu-path":
        res = gpupath.gpu_path(args.model, args.device, args.dtype, not args.in_process, args.repeats, args.slow_s,
                               args.steps, args.images, ops=args.ops or gpupath.OPS,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        res["command"] = "python -m sepme_lib.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        res["markdown"] = gpupath.markdown(res)
    elif args.what == "capacity":
        res = dict(rows=nullspace.capacity_rows())
        res["markdown"] = nullspace.capacity_markdown(res["rows"])
    elif args.what == "robustness" and args.tradeoff:
        res = robustness.tradeoff(prof, progress=True, checkpoint=(lambda out: save(out)) if args.save else None)
    elif args.what == "robustness":  # with --save, methods already in the saved file are kept, not rerun
        res = robustness.benchmark(prof, args.methods and args.methods.split(","), progress=True,
                                   previous=json.loads(path.read_text()) if args.save and path.exists() else None,
                                   checkpoint=(lambda out: save(dict(out, complete=False))) if args.save else None)
        res["complete"] = True
    elif args.what == "relatives":
        res = relatives_benchmark(prof, methods_=methods_)
        if args.save and methods_ and path.exists():
            res = _merge_relatives(res, path)
    else:
        res = bench_widgets(args.repeats)
    if args.save:
        save(res)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1, default=float))
    elif "markdown" in res:
        print(res["markdown"])
    elif args.what == "quality":
        print(f"guidance {res['guidance']}, {res['steps']} DDIM steps, {res['images_per_concept']} images per concept")
        print(report.markdown_table([res["style"]], list(res["style"])))
        print()
        print(report.markdown_table([res["shape"]], list(res["shape"])))
        print(f"\n{res['seconds']} s")
    else:
        print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
