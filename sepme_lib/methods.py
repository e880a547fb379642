"""Every erasure method behind one call, ``erase(model, concepts, method=..., **settings)``, and the one
table of their hyper-parameters per model family.

Introduced in ``notebooks/02_gcirs_correlation_loss.ipynb`` (``method="gcirs"``) and used by every later notebook,
the benchmarks and the command line. ``DEFAULTS[method]["sd"]`` holds what each paper used on Stable Diffusion 1.x
(a value the papers bundled with the course do not state is marked in a comment, with where ours comes from);
``DEFAULTS[method]["tiny"]`` holds the values tuned on the bundled model (the README's "Tuned defaults" table gives
the measurements behind them). :func:`settings` picks the row of ``model.family`` and applies the caller's overrides.
"""
from __future__ import annotations

import math

from . import closed_form, families, finetune, gcirs, sepme, speed
from .concepts import as_concepts
from .config import SepmeError
from .deltas import Delta

_SEPME_SD = gcirs.Settings().as_dict()  # the paper's values: lr 1e-2, beta 1e-4, lam 3e-5, tau 0, alpha 0.9, cap 1000
_SEPME_TINY = dict(_SEPME_SD, lr=2e-2, gcirs_lr=1e-4, beta=5e-2, lam=0.0, tau=-2e-3, gcirs_tau=-8e-3, cap=300,
                   batch=4, single="anchors")

# Stop thresholds that differ from the one tau above, per family (None: the one tau). The bundled model's SepME_2
# stage 2 protects only c_0 and striped's prompts; at tau -2e-3 it stopped after 108 steps with checkered still at
# 0.25 (20 images), at -4e-3 after 174 steps at 0.00 (notebook 04). Its joint loop: at -2e-3 striped's monitor (concept
# 1, the reference of eta_i) fired at step 206 with striped at 0.16-0.20; at -4e-3 all three erase (notebook 07).
TAU_FACTORS = {"tiny": {"iterative": (1, 2, 1), "joint": 2}, "sd": {}}


def mode_tau(model, mode: str, n_concepts: int):
    """SepME's ``tau`` for ``mode`` on ``model``'s family: the settings' tau scaled by :data:`TAU_FACTORS` (one value
    per stage for ``iterative``, the last factor repeated for more stages), else the settings' tau unchanged."""
    family = families.settings_key(model)
    tau = DEFAULTS["sepme"][family]["tau"]
    f = TAU_FACTORS.get(family, {}).get(mode)
    if f is None:
        return tau
    if isinstance(f, tuple):
        return [tau * f[min(i, len(f) - 1)] for i in range(n_concepts)]
    return tau * f


DEFAULTS = {
    # SepME and G-CiRs share one settings object (gcirs.Settings). Tiny: see the README's tuned-defaults table
    # (tau sweep: -2e-3 erases to 0.00 on 20 and 50 images, -5e-4 left 0.15 on the notebooks' 20; single-concept
    # remedy); batch 4 because the monitor stops batch-2 runs before they erase.
    "sepme": {"sd": _SEPME_SD, "tiny": _SEPME_TINY},
    "gcirs": {"sd": _SEPME_SD, "tiny": _SEPME_TINY},
    # ESD-x: cross-attention only, negative guidance eta 1, Adam 1e-5, 1000 steps (as the SepME and All-but-One
    # texts recount). Tiny: 1e-5 changes nothing in a few hundred steps; 5e-4 x 150 erased striped (0.3, others 0.98).
    "esd": {"sd": dict(params="cross_attention", eta=1.0, lr=1e-5, steps=1000, batch=1, seed=0),
            "tiny": dict(params="cross_attention", eta=1.0, lr=5e-4, steps=150, batch=4, seed=0)},
    # Ablating Concepts, model-based, to_k/to_v for styles; 200 steps (All-but-One: "recommends 200 steps"); its
    # learning rate is not stated in the texts bundled here: ESD's 1e-5 is used. Tiny: 1e-3 x 150 (striped 0.0).
    "ablating": {"sd": dict(params="kv", lr=1e-5, steps=200, batch=1, n_anchor=16, anchor_steps=50, seed=0),
                 "tiny": dict(params="kv", lr=1e-3, steps=150, batch=4, n_anchor=16, anchor_steps=10, seed=0)},
    # Forget-Me-Not: 35 steps (All-but-One, "Training Efficiency"); learning rate not stated in the bundled texts:
    # ESD's 1e-5. Tiny: 1e-3 x 35 (3e-4 changes nothing).
    "fmn": {"sd": dict(params="cross_attention", lr=1e-5, steps=35, batch=1, seed=0),
            "tiny": dict(params="cross_attention", lr=1e-3, steps=35, batch=4, seed=0)},
    # All-but-One "Training Setup": 200 steps, AdamW 1e-5, g1 = g2 = 7.5, lam 5; kappa (the bottleneck quantile) not
    # stated: 0.5. Tiny: g1 = g2 = 1 (7.5 only rescales the concept term against lam), lam 1, 5e-4 x 100.
    "all_but_one": {"sd": dict(params="cross_attention", lr=1e-5, steps=200, batch=1, g1=7.5, g2=7.5, lam=5.0,
                               erase_scale=1.0, kappa=0.5, seed=0),
                    "tiny": dict(params="cross_attention", lr=5e-4, steps=100, batch=4, g1=1.0, g2=1.0, lam=1.0,
                                 erase_scale=1.0, kappa=0.5, seed=0)},
    # UCE's released edit_model (official=True): lam 0.5, e 1, p = max(0.1, 1/len(retain)) (None), keys from the last
    # word to the end, '' and the preserve prompts with all rows. Bundled model: the same (measured on striped, 20
    # images per style: erased 0.00, others 1.00; the earlier non-official rows gave 0.00 / 0.99).
    "uce": {"sd": dict(lam=0.5, erase_scale=1.0, preserve_scale=None, keys="tail", official=True),
            "tiny": dict(lam=0.5, erase_scale=1.0, preserve_scale=None, keys="tail", official=True)},
    # RECE Sec. 4 and its released code for artistic styles (official=True): lam 0.1, preserve 0.1, reg 1e-3, 1 epoch.
    # Bundled model: the same (striped, 20 images: erased 0.00, others 1.00; the earlier non-official re-solves toward
    # the anchors' original values with 3 epochs and the last epoch kept gave 0.30 / 0.84).
    "rece": {"sd": dict(lam=0.1, preserve_scale=0.1, epochs=1, reg=1e-3, keys="tail", official=True),
             "tiny": dict(lam=0.1, preserve_scale=0.1, epochs=1, reg=1e-3, keys="tail", official=True)},
    # MACE appendix Table 9 (100 artistic styles): lambda_1 (general prior) 1e-4, lambda_3 (domain) 8.0, no ridge
    # (a 1e-3 ridge keeps it well-posed). Tiny: 0.05 / 1.0 (the paper's are relative to thousands of COCO captions).
    "mace": {"sd": dict(lam=1e-3, lam_general=1e-4, lam_domain=8.0, phrase_rows="keep", n_general=64),
             "tiny": dict(lam=1e-3, lam_general=0.05, lam_domain=1.0, phrase_rows="keep", n_general=64)},
    # SPEED, the authors' train_erase_null.py: to_v only, last-word rows, the names mapped to "art" (their style
    # scripts), aug 10, threshold 0.1, alpha 1, lambda 0, filter on, 3 clusters of c_0. Tiny: the prompts with their
    # anchors, all rows 1..L-1 (the authors' nudity mode; last-word rows left striped at 0.38), to_k and to_v, the
    # general prior, threshold 1e-5 (0.1 keeps 231 of 256 dimensions here); README, "Beyond the paper".
    "speed": {"sd": dict(params="V", keys="last", targets="names", anchor_text="art", aug=10, threshold=0.1,
                         retain_scale=1.0, lamb=0.0, filter=True, clusters=3, chunk=128, seed=0),
              "tiny": dict(params="KV", keys="all", targets="prompts", anchor_text="", aug=10, threshold=1e-5,
                           retain_scale=1.0, lamb=0.0, filter=True, clusters=3, chunk=128, seed=0)},
}

# Beyond the paper (notebook 08): SepME with concept-level protection (a soft null space of a general prior beside the
# exact A_i), erasure to the anchor and a cached pool of x_t, for erase(..., method="sepme", **concept_level(model)).
# Not the default of method="sepme": the default stays the paper's exact prompt-level SepME (README, "Beyond the
# paper", gives the measurements of both).
# Tiny: soft 1e-6, the point of the trade-off curve in the README's "Beyond the paper" that erases with the smallest
# held-out change. SD: not measured (no SD weights here); soft 1e-4 keeps 109 of 134 dimensions on the random-weight
# stand-in, where 1e-6 keeps 7 (below min_null_dim).
CONCEPT_LEVEL = {"tiny": dict(protection="concept", soft=1e-6, target="anchor", anchor_tau=0.3, lr=0.1, cache=64,
                              cap=150),
                 "sd": dict(protection="concept", soft=1e-4, target="anchor", anchor_tau=0.3, cache=64)}

# Robust SepME (beyond the paper, notebook 09; erase(..., method="sepme", robust=True) or a dict of overrides): rounds of
# attack -> train on what was found (sepme.harden). Tiny: textual inversion only; rounds on the derived embedding
# cannot help (it lies in the protected span, notebook 09 section 5: three rounds on it left it at 1.00 on striped and
# cost 210 s per concept). Measured in data/results/robustness_full.json. SD: the same recipe, not measured.
ROBUST = {"tiny": dict(rounds=2, attacks=("inversion",), inversion_steps=100, reg=1e-3),
          "sd": dict(rounds=2, attacks=("inversion",), inversion_steps=300, reg=1e-3)}
# The attacks' budgets (attacks.run's settings) per family: notebook 09 and `bench robustness`. Tiny inversion: batch
# 8 recovered 0.45 from the bundled striped increment where batch 4 recovered 0.30 (300 steps, 20 images).
ATTACK_BUDGETS = {"tiny": {"derived": dict(reg=1e-3), "inversion": dict(steps=300, lr=5e-3, batch=8),
                           "prompt_search": dict(tokens=3, sweeps=1, batch=8, candidates=0)},
                  "sd": {"derived": dict(reg=1e-3), "inversion": dict(steps=1000, lr=5e-3, batch=1),
                         "prompt_search": dict(tokens=3, sweeps=1, batch=4, candidates=256)}}

# arguments each method takes besides its settings (prompt sets and switches, not hyper-parameters)
ARGUMENTS = {"sepme": ("mode", "protect", "anchor", "prior", "robust"), "gcirs": ("params",), "esd": (),
             "ablating": ("anchor",), "fmn": ("words",), "all_but_one": ("anchor", "instructions"),
             "uce": ("anchor", "preserve"), "rece": ("anchor", "preserve"), "mace": ("mapped", "preserve", "general"),
             "speed": ("anchor", "prior")}
CLOSED_FORM = ("uce", "rece", "mace", "speed")
_CHOICES = {"speed": dict(params=("V", "KV"), keys=speed.KEYS, targets=("names", "prompts"))}
METHODS = tuple(DEFAULTS)
_POSITIVE_INT = ("steps", "batch", "n_anchor", "anchor_steps", "n_general", "clusters", "chunk")
_NON_NEGATIVE = ("lam", "erase_scale", "preserve_scale", "reg", "lam_general", "lam_domain", "epochs", "threshold",
                 "retain_scale", "lamb")


class MethodError(SepmeError, ValueError):
    """Bad input to :func:`erase` (the message names the problem and the fix)."""


def check_method(method: str) -> None:
    if method not in DEFAULTS:
        raise MethodError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def settings(method: str, model, **overrides) -> dict:
    """The settings of ``method`` for ``model``'s family (``DEFAULTS``) with ``overrides`` applied and checked."""
    check_method(method)
    family = families.settings_key(model)
    base = dict(DEFAULTS[method][family])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise MethodError(f"{method}: unknown setting(s) {unknown}; settings are {sorted(base)}, arguments are "
                          f"{list(ARGUMENTS[method])} (defaults in methods.DEFAULTS[{method!r}][{family!r}])")
    for k, v in overrides.items() if method not in ("sepme", "gcirs") else ():  # the default's type; finite numbers
        d = base[k]
        if isinstance(d, bool) and not isinstance(v, bool):
            raise MethodError(f"{method}: {k} must be True or False, got {v!r}")
        if isinstance(d, (int, float)) and not isinstance(d, bool) and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise MethodError(f"{method}: {k} must be a finite number (default {d!r}), got {v!r}")
        if isinstance(d, int) and not isinstance(d, bool) and not isinstance(v, int):
            raise MethodError(f"{method}: {k} must be a whole number (default {d!r}), got {v!r}")
        if isinstance(d, str) and not isinstance(v, str):
            raise MethodError(f"{method}: {k} must be a string (default {d!r}), got {v!r}")
    base.update(overrides)
    if method in ("sepme", "gcirs"):
        try:
            gcirs.Settings(**base)  # validates every field
        except ValueError as e:
            raise MethodError(f"{method}: {e}") from None
        return base
    if method in ("uce", "rece"):
        if base["keys"] not in closed_form.KEY_MODES:
            raise MethodError(f"{method}: keys must be one of {closed_form.KEY_MODES}, got {base['keys']!r}")
        if base["official"] and base["keys"] != "tail":
            raise MethodError(f"{method}: keys={base['keys']!r} is used only with official=False (the authors' code, "
                              "official=True, always takes the 'tail' rows); pass official=False too, or drop keys")
    for k, lo, hi in (("kappa", 0.0, 1.0), ("seed", 0, 2**63 - 1)):
        if k in base and not lo <= base[k] <= hi:
            raise MethodError(f"{method}: {k} must be in [{lo}, {hi}], got {base[k]!r}")
    if base.get("phrase_rows", "keep") not in ("keep", "map"):
        raise MethodError(f"{method}: phrase_rows must be 'keep' or 'map', got {base['phrase_rows']!r}")
    for k, v in base.items():
        if k in _POSITIVE_INT and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MethodError(f"{method}: {k} must be a whole number >= 1, got {v!r}")
        if k == "epochs" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise MethodError(f"{method}: epochs must be a whole number >= 0, got {v!r}")
        if k in _NON_NEGATIVE and v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise MethodError(f"{method}: {k} must be a finite number >= 0, got {v!r}")
        if k == "lr" and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise MethodError(f"{method}: lr must be a finite number > 0, got {v!r}")
        if k == "aug" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise MethodError(f"{method}: aug must be a whole number >= 0, got {v!r}")
        if k in _CHOICES.get(method, {}) and v not in _CHOICES[method][k]:
            raise MethodError(f"{method}: {k} must be one of {_CHOICES[method][k]}, got {v!r}")
    return base


def concept_level(model, **overrides) -> dict:
    """The settings of SepME with concept-level protection, erasure to the anchor and a cached pool
    (:data:`CONCEPT_LEVEL`, notebook 08) for ``model``'s family, with ``overrides``, checked: pass them to
    ``erase(model, names, method="sepme", **concept_level(model))``."""
    family = families.settings_key(model)
    out = dict(CONCEPT_LEVEL[family], **overrides)
    settings("sepme", family, **out)
    return out


def erase(model, concepts, method: str = "sepme", progress: bool = False, n_ref: int = 64, checkpoint=None,
          **settings_) -> list[Delta]:
    """Erase ``concepts`` from ``model`` with ``method``; returns one :class:`Delta` per concept for SepME, one for
    all concepts otherwise (G-CiRs and the relatives edit one shared increment).

    ``concepts``: :class:`~sepme_lib.concepts.Concept` objects or names of the model's concept set. ``method``: one
    of :data:`METHODS`. Keyword arguments are the method's settings (``DEFAULTS``) and arguments (``ARGUMENTS``:
    ``mode="separate"|"joint"|"iterative"``, ``protect=``, ``anchor=`` for SepME; ``anchor=``/``preserve=`` for UCE
    and RECE; ...). Everything is checked before any model work starts. ``checkpoint``: a
    ``checkpoint.Checkpoint`` the training loops save to every few steps and resume from (a killed run restarted with
    the same folder continues from its last save and ends with the same increments; closed forms have no loop)."""
    check_method(method)
    args = {k: settings_.pop(k) for k in list(settings_) if k in ARGUMENTS[method]}
    s = settings(method, model, **settings_)
    if method == "sepme" and args.get("mode", "separate") not in sepme.MODES:
        raise MethodError(f"unknown mode {args['mode']!r}; use one of {', '.join(sepme.MODES)}")
    concepts = as_concepts(model, concepts, n_ref=n_ref)
    if method == "sepme" and "tau" not in settings_:  # the mode's own stop thresholds (TAU_FACTORS), unless given
        s["tau"] = mode_tau(model, args.get("mode", "separate"), len(concepts))
    if method == "sepme" and args.get("robust") not in (None, False):
        extra = args["robust"] if isinstance(args["robust"], dict) else {}
        args["robust"] = dict(ROBUST[families.settings_key(model)], **extra) if args["robust"] is True or extra else args["robust"]
    elif method == "sepme":
        args.pop("robust", None)
    if method == "sepme":
        out = sepme.sepme(model, concepts, settings=gcirs.Settings(**s), progress=progress, checkpoint=checkpoint,
                          **args)
    elif method == "gcirs":
        out = [gcirs.gcirs(model, concepts, gcirs.Settings(**s), progress=progress, checkpoint=checkpoint, **args)]
    elif method == "speed":
        out = [speed.speed(model, concepts, s, **args)]
    elif method in CLOSED_FORM:
        out = [getattr(closed_form, method)(model, concepts, s, **args)]
    else:
        out = [getattr(finetune, method)(model, concepts, s, progress=progress, checkpoint=checkpoint, **args)]
    for d in out:  # every delta records what made it (docs/DESIGN.md, "Delta files")
        d.info.setdefault("prompts", [p for c in concepts for p in c.prompts])
        d.info.setdefault("anchors", [])
        d.info.setdefault("protected", [])
        d.info["model"] = model.name
    return out


def profile_settings(method: str, prof: dict) -> dict:
    """Overrides of ``method`` for a profile (``config.profile(...)``) in notebook 06's comparison and the relatives
    benchmark: none in ``full``; in ``ci`` every trained method runs only ``prof["finetune_steps"]`` steps (SepME and
    G-CiRs included; notebooks 02-04 train those fully in ci), and Ablating draws 8 anchor images of
    ``prof["sample_steps"]`` DDIM steps. Closed forms: none."""
    check_method(method)
    if method in CLOSED_FORM or prof.get("finetune_steps") is None:
        return {}
    if method in ("sepme", "gcirs"):
        return dict(cap=prof["finetune_steps"], single_warmup=0)
    out = dict(steps=prof["finetune_steps"])
    if method == "ablating":
        out.update(n_anchor=8, anchor_steps=prof["sample_steps"])
    return out


def attack_budgets(model, prof: dict) -> dict:
    """:data:`ATTACK_BUDGETS` of the model's family (notebook 09); where its family caps ci training (``ci_cap``: a
    random-weight SD folder on a CPU, ``make test-sd``) every attack loop runs ``prof["sd_cap"]`` steps / candidates,
    and ``"robust"`` gives the inversion steps of robust SepME's rounds (plumbing only)."""
    out = {a: dict(b) for a, b in ATTACK_BUDGETS[families.settings_key(model)].items()}
    out["robust"] = dict(inversion_steps=ROBUST[families.settings_key(model)]["inversion_steps"])
    cap = prof.get("sd_cap")
    if families.family_of(model).ci_cap and cap is not None:
        out["inversion"]["steps"] = cap
        out["prompt_search"].update(tokens=1, candidates=cap)
        out["robust"]["inversion_steps"] = cap
    return out


def course_settings(method: str, model, prof: dict) -> dict:
    """Overrides of ``method`` in notebooks 02-05 for a profile: none on the bundled model (SepME and G-CiRs train
    as in full, stopped by Eq. 4, since that is what those notebooks teach); on Stable Diffusion in ``ci`` (random
    weights on a CPU, ``make test-sd``) and ``colab`` (a T4) the trained methods stop after ``prof["sd_cap"]`` steps."""
    check_method(method)
    if not families.family_of(model).ci_cap or prof.get("sd_cap") is None or method in CLOSED_FORM:
        return {}
    if method in ("sepme", "gcirs"):
        return dict(cap=prof["sd_cap"])
    return dict(steps=prof["sd_cap"])
