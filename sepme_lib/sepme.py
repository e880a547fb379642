"""SepME (paper Sec. 3.2, Algorithm 2): one increment ``dTheta_i`` per concept, in separate, joint and
iterative modes; restoration is leaving an increment out.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb`` (separate mode, written out once in the notebook)
and ``notebooks/04_iterative_erasure_and_restoration.ipynb`` (iterative mode, restoration).

The protected set ``A_i`` of concept ``i`` (Eq. 8) stacks ``c_0``, every prompt of the concepts it must not touch and
``protect``:

* ``"separate"`` (SepME_1): every other concept; each increment trained alone;
* ``"joint"`` (SepME_1 in one loop, the authors' ``SepCE.py``): the same null spaces, all increments trained together
  with eta balancing, each concept stopped by its own monitor and its increment frozen then;
* ``"iterative"`` (SepME_2): ``dTheta_1`` by G-CiRs on all cross-attention parameters, then ``dTheta_t`` with ``A_t``
  = ``c_0`` + concepts ``1..t-1`` + ``protect``, trained on the base weights alone.

One concept alone (``single="anchors"``, the bundled model's default, see ``methods.DEFAULTS``): ``A`` = ``c_0`` +
the concept's anchor prompts (its prompts with the concept phrase removed), and at least ``single_warmup`` steps
before the stop test. Without it, an increment is free to change the keys of the words every caption shares (README,
"SepME on one concept"). ``single="plain"`` is the paper's ``A = {c_0}``.

Beyond the paper (notebook 08; settings of ``gcirs.Settings``, the paper's behaviour by default):

* ``protection="concept"``: ``A_i`` stays exact (certified) and a soft null space (cut ``soft``) also keeps the
  rows of a general prior nearly unchanged: ``c_0`` and the build captions of every other concept of the set
  (``concepts.prior_captions``); each concept trains on its own build captions; SepME_2's first stage is a
  decoupled increment too (``A_1 = c_0`` + the prior) instead of G-CiRs on all cross-attention parameters;
* ``target="anchor"``: the increment maps each prompt to its anchor's representation (``gcirs.anchor_residual``);
* ``cache``: the frozen outputs of a fixed pool of ``x_t`` (``gcirs._pool``).
"""
from __future__ import annotations

import torch

from . import attacks, config
from .concepts import (
    Concept,
    ConceptError,
    anchors_for,
    caption_split,
    check_clashes,
    concept_set,
    prior_captions,
    prompt_list,
)
from .config import BadValue
from .deltas import Delta
from .gcirs import Settings, gcirs, to_delta, train
from .nullspace import decoupled_increment

MODES = ("separate", "joint", "iterative")
METHOD_NAMES = {"separate": "sepme1", "joint": "sepme1_joint", "iterative": "sepme2"}


def protected_sets(concepts, mode: str, protect=()) -> list:
    """``A_i``'s prompts for every concept (``None`` for SepME_2's first concept, which G-CiRs trains)."""
    protect = list(protect)
    prompts = [c.prompts for c in concepts]

    def flat(lists):
        return [p for ps in lists for p in ps]

    if mode == "iterative":
        return [None] + [[""] + flat(prompts[:t]) + protect for t in range(1, len(concepts))]
    return [[""] + flat(prompts[:i] + prompts[i + 1:]) + protect for i in range(len(concepts))]


def _known(model, name: str) -> bool:
    try:
        concept_set(model).check(name)
        return True
    except ConceptError:
        return False


def concept_level(model, concepts, prior=None):
    """``protection="concept"``: the concepts with their build captions as prompts (``concepts.caption_split``;
    a concept outside the model's concept set keeps its prompts) and, per concept, the soft prior ``c_0`` + the
    general prior without that concept (``concepts.prior_captions``; ``prior``: a caption file on SD)."""
    train = [Concept(c.name, list(dict.fromkeys(c.prompts + caption_split(model, c.name)[0])), c.latents)
             if _known(model, c.name) else c for c in concepts]
    priors = [[""] + [p for p in prior_captions(model, [c.name], prior) if p not in set(t.prompts)]
              for c, t in zip(concepts, train)]
    return train, priors


ROBUST_KEYS = {"rounds": int, "attacks": (list, tuple), "inversion_steps": int, "reg": float}


def check_robust(robust, mode: str) -> dict | None:
    """``robust``: ``None`` or a dict of :data:`ROBUST_KEYS` (``methods.ROBUST`` fills the family's defaults)."""
    if robust is None:
        return None
    if not isinstance(robust, dict) or set(robust) - set(ROBUST_KEYS):
        raise BadValue(f"robust must be None, True or a dict with keys {sorted(ROBUST_KEYS)}, got {robust!r:.80}")
    if mode != "separate":
        raise BadValue(f"robust SepME trains each increment alone: use mode='separate', not {mode!r}")
    bad = [a for a in robust.get("attacks", ()) if a not in attacks.NAMES]
    if bad or not robust.get("attacks"):
        raise BadValue(f"robust attacks must be a non-empty list of {', '.join(attacks.NAMES)}, got "
                       f"{robust.get('attacks')}")
    if not isinstance(robust.get("rounds"), int) or isinstance(robust["rounds"], bool) or robust["rounds"] < 1:
        raise BadValue(f"robust rounds must be a whole number >= 1, got {robust.get('rounds')!r}")
    return robust


def harden(model, concept: Concept, inc, s: Settings, robust: dict, progress: bool = True, anchors=None) -> list:
    """Robust SepME (beyond the paper, notebook 09): ``robust["rounds"]`` rounds of (1) attack the increment as it is
    (RECE's derived ``c'`` and/or textual inversion, :mod:`attacks`), (2) add each condition the attacks found to the
    concept's training set, paired with the prompt it imitates (the frozen model's ``r_theta(prompt)`` is what the
    edited model's ``r_{theta+dtheta}(c')`` must decorrelate from), (3) train the same ``w`` further (Eq. 10: still
    ``dW = beta w S^T`` in the same null space, so the certificate on ``A`` stays exact and the increments stay
    separable). The found conditions accumulate over rounds, as RECE's do. Returns one record per round."""
    base = concept.embedding(model)
    frozen, edited, record = [base], [base], []
    for r in range(robust["rounds"]):
        current = to_delta(model, inc, concept.name, "sepme1", s, None)
        for name in robust["attacks"]:
            if name == "derived":
                found = attacks.derived_embeddings(model, [current], base, robust.get("reg", 1e-3))
            elif name == "prompt_search":
                found = attacks.prompt_search(model, [current], concept, concept.prompts, tokens=3, sweeps=1, batch=8,
                                              seed=s.seed + r)["embeddings"]
            else:
                found = attacks.inversion(model, [current], concept, concept.prompts, steps=robust["inversion_steps"],
                                          seed=s.seed + r)["embeddings"]
            frozen.append(base)
            edited.append(found)
        hard = Concept(concept.name, concept.prompts * len(frozen), concept.latents, emb=torch.cat(frozen),
                       edit_emb=torch.cat(edited))
        inc.stopped_at = None
        hist = train(model, [hard], [inc], [0], s, skip_empty=True, progress=progress,
                     desc=f"robust SepME {concept.name} round {r + 1}",
                     anchors=None if anchors is None else [list(anchors) * len(frozen)])
        record.append(dict(round=r + 1, steps=inc.stopped_at, conditions=len(hard.prompts),
                           stop=inc.info.get("stop_reason"), final_lmom=hist["lmom"][0][-1]))
    return record


def sepme(model, concepts, mode: str = "separate", settings: Settings | None = None, protect=(), anchor=None,
          progress: bool = True, checkpoint=None, prior=None, robust: dict | None = None) -> list[Delta]:
    """SepME: one :class:`Delta` per concept, ``dW_i = beta w_i S_i^T`` on every attn2 to_k/to_v (Algorithm 2).

    ``settings``: a :class:`Settings` (``erase(..., method="sepme")`` fills it from ``methods.DEFAULTS`` for the
    model's family; ``None`` here means the paper's values). ``protect``: extra prompts every increment must leave
    unchanged. ``anchor``: the anchors of a single concept when ``settings.single == "anchors"`` (default: the
    concept set's rule). Capacity is checked for every concept before any training starts
    (``nullspace.CapacityError``). ``checkpoint``: a ``checkpoint.Checkpoint`` every training loop saves to and
    resumes from (the command line's resumable ``erase``). ``prior``: with ``protection="concept"`` on SD, a caption
    file for the general prior (module docstring; ``anchor`` then also names the targets of ``target="anchor"``)."""
    s = settings or Settings()
    if mode not in MODES:
        raise BadValue(f"sepme: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    concepts = list(concepts)
    if not concepts:
        raise BadValue("sepme needs at least one concept")
    protect = prompt_list(protect, "protect")
    robust = check_robust(robust, mode)
    concept_mode = s.protection == "concept"
    single = len(concepts) == 1 and mode in ("separate", "joint") and s.single == "anchors" and not concept_mode
    anchors = anchors_for(model, concepts[0], anchor) if single else []
    if single:
        protect += anchors
        s = Settings(**dict(s.as_dict(), warmup=max(s.warmup, s.single_warmup)))
    check_clashes(model, concepts, protect)
    taus = list(s.tau) if isinstance(s.tau, (list, tuple)) else [s.tau] * len(concepts)
    if len(taus) != len(concepts):
        raise ValueError(f"{len(taus)} stop thresholds (tau) for {len(concepts)} concepts; give one, or one per concept")
    if s.target == "anchor":  # the monitor watches the anchor residual
        taus = [s.anchor_tau] * len(concepts)
    sets = protected_sets(concepts, mode, protect)
    priors = [None] * len(concepts)
    if concept_mode:  # exact A_i as above, plus a soft prior; each concept trains on its build captions
        concepts, priors = concept_level(model, concepts, prior)
        sets[0] = sets[0] if sets[0] is not None else [""] + protect
        check_clashes(model, concepts, protect)
    targets = [anchors_for(model, c, anchor) for c in concepts] if s.target == "anchor" else None
    # build (and capacity-check) every increment before training anything
    incs = [None if p is None else decoupled_increment(model, c.name, p, s.beta, s.min_null_dim, s.lr, tau, q, s.soft)
            for c, p, tau, q in zip(concepts, sets, taus, priors)]
    method = METHOD_NAMES[mode]
    extra = [dict(mode=mode, stage=t + 1, prompts=list(c.prompts), anchors=targets[t] if targets else anchors)
             for t, c in enumerate(concepts)]
    if mode == "joint":
        hist = train(model, concepts, incs, list(range(len(concepts))), s, skip_empty=True, progress=progress,
                     desc="SepME joint", checkpoint=checkpoint, anchors=targets)
        return [to_delta(model, inc, c.name, method, s, hist, e) for inc, c, e in zip(incs, concepts, extra)]
    deltas = []
    for t, (c, inc, e) in enumerate(zip(concepts, incs, extra)):
        if inc is None:  # SepME_2 step 1: G-CiRs on all cross-attention parameters
            d = gcirs(model, [c], s, progress=progress, checkpoint=checkpoint)
            d.method = method
            d.info.update(e)
        else:
            hist = train(model, [c], [inc], [0], s, skip_empty=True, progress=progress, desc=f"SepME {c.name}",
                         checkpoint=checkpoint, anchors=None if targets is None else [targets[t]])
            if robust is not None:
                e = dict(e, robust=dict(robust, attacks=list(robust["attacks"]),
                                        rounds_done=harden(model, c, inc, s, robust, progress,
                                                           None if targets is None else targets[t])))
            d = to_delta(model, inc, c.name, method + ("_robust" if robust is not None else ""), s, hist, e)
        deltas.append(d)
    return deltas


def bundled_deltas(model, names=("striped", "checkered", "dotted")) -> list[Delta]:
    """The bundled model's SepME_1 increments of ``names`` (``data/deltas/``, written by ``python -m sepme_lib.bench
    deltas`` with ``erase(model, names, method="sepme")``). Notebook 05 uses them so that its widget shows a real
    erasure without minutes of training. Refuses another base model (``deltas.BaseModelMismatch``)."""
    out = []
    for name in names:
        path = config.BUNDLED_DELTAS / f"sepme1_{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no bundled increment for {name!r} at {path}; bundled: "
                                    f"{sorted(p.stem for p in config.BUNDLED_DELTAS.glob('*.safetensors'))}. "
                                    "Create them with `python -m sepme_lib.bench deltas`")
        d = Delta.load(path, device=model.device)
        d.check_base(model)
        out.append(d)
    return out
