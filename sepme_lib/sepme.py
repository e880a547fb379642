"""SepME (paper Sec. 3.2, Algorithm 2): one increment ``dTheta_i`` per concept, in separate, joint and
iterative modes; restoration is leaving an increment out.

Introduced in ``notebooks/03_weight_decoupling_nullspace.ipynb`` (separate mode, written out once in the notebook)
and ``notebooks/04_iterative_erasure_and_restoration.ipynb`` (iterative mode, restoration).

The protected set ``A_i`` of concept ``i`` (Eq. 5) stacks ``c_0``, every prompt of the concepts it must not touch and
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
"""
from __future__ import annotations

from . import config
from .concepts import anchors_for
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


def sepme(model, concepts, mode: str = "separate", settings: Settings | None = None, protect=(), anchor=None,
          progress: bool = True, checkpoint=None) -> list[Delta]:
    """SepME: one :class:`Delta` per concept, ``dW_i = beta w_i S_i^T`` on every attn2 to_k/to_v (Algorithm 2).

    ``settings``: a :class:`Settings` (``erase(..., method="sepme")`` fills it from ``methods.DEFAULTS`` for the
    model's family; ``None`` here means the paper's values). ``protect``: extra prompts every increment must leave
    unchanged. ``anchor``: the anchors of a single concept when ``settings.single == "anchors"`` (default: the
    concept set's rule). Capacity is checked for every concept before any training starts
    (``nullspace.CapacityError``). ``checkpoint``: a ``checkpoint.Checkpoint`` every training loop saves to and
    resumes from (the command line's resumable ``erase``)."""
    s = settings or Settings()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    concepts = list(concepts)
    if not concepts:
        raise ValueError("sepme needs at least one concept")
    protect = list(protect)
    if any(not isinstance(p, str) for p in protect):
        raise TypeError(f"protect must be a list of prompt strings, got {protect!r}")
    single = len(concepts) == 1 and mode in ("separate", "joint") and s.single == "anchors"
    anchors = anchors_for(model, concepts[0], anchor) if single else []
    if single:
        protect += anchors
        s = Settings(**dict(s.as_dict(), warmup=max(s.warmup, s.single_warmup)))
    erased = {p for c in concepts for p in c.prompts}
    clash = sorted(erased & set(protect))
    if clash:
        raise ValueError(f"prompt(s) {clash} are both erased and protected: the increment could not change them. "
                         "Remove them from protect= (or from the concept's prompts).")
    taus = list(s.tau) if isinstance(s.tau, (list, tuple)) else [s.tau] * len(concepts)
    if len(taus) != len(concepts):
        raise ValueError(f"{len(taus)} stop thresholds (tau) for {len(concepts)} concepts; give one, or one per concept")
    sets = protected_sets(concepts, mode, protect)
    # build (and capacity-check) every increment before training anything
    incs = [None if p is None else decoupled_increment(model, c.name, p, s.beta, s.min_null_dim, s.lr, tau)
            for c, p, tau in zip(concepts, sets, taus)]
    method = METHOD_NAMES[mode]
    extra = [dict(mode=mode, stage=t + 1, prompts=list(c.prompts), anchors=anchors) for t, c in enumerate(concepts)]
    if mode == "joint":
        hist = train(model, concepts, incs, list(range(len(concepts))), s, skip_empty=True, progress=progress,
                     desc="SepME joint", checkpoint=checkpoint)
        return [to_delta(model, inc, c.name, method, s, hist, e) for inc, c, e in zip(incs, concepts, extra)]
    deltas = []
    for c, inc, e in zip(concepts, incs, extra):
        if inc is None:  # SepME_2 step 1: G-CiRs on all cross-attention parameters
            d = gcirs(model, [c], s, progress=progress, checkpoint=checkpoint)
            d.method = method
            d.info.update(e)
        else:
            hist = train(model, [c], [inc], [0], s, skip_empty=True, progress=progress, desc=f"SepME {c.name}",
                         checkpoint=checkpoint)
            d = to_delta(model, inc, c.name, method, s, hist, e)
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
