"""Layer 3: SepME -- G-CiRs (Alg. 1) and weight decoupling (Alg. 2) in separate, joint and iterative modes.

Introduced in ``notebooks/02_gcirs_correlation_loss.ipynb`` (G-CiRs), ``03_weight_decoupling_nullspace``
(decoupling, SepME_1) and ``04_iterative_erasure_and_restoration`` (SepME_2, restoration).

One training loop serves every mode. Trainable tensors come in *groups*; each concept belongs to one
group (G-CiRs: one group for all concepts; decoupled: one group per concept). Every step it

1. draws ``x_t`` from each active concept's reference set (fresh ``t ~ U{0..T-1}`` and noise),
2. computes the frozen ``r_theta(c) = eps(x_t,c) - eps(x_t,c_0)`` without gradient,
3. runs the edited model ``theta + sum_g dTheta_g`` once (``torch.func.functional_call``, no UNet copy),
   skipping its empty-prompt pass when every group protects ``c_0`` (then it equals the frozen one),
4. minimises ``sum_i eta_i L_cor_i + lambda (1/M) sum ||.||_1`` (Eqs. 2, 3, 11) with Adam, clearing
   gradients every step, and
5. feeds each group's ``sum_i eta_i L_cor_i`` to its own momentum monitor (Eq. 4); a stopped group is
   frozen at that step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import config, core
from .deltas import Delta

PAPER_DEFAULTS = dict(gcirs=dict(lr=1e-6, lam=3e-5), sepme=dict(lr=1e-2, beta=1e-4, lam=3e-5), alpha=0.9, tau=0.0,
                      cap=1000)


@dataclass
class Settings:
    """Hyper-parameters of one erasure run. Defaults are tuned for the bundled tiny model (README); the
    paper's SD values are in ``PAPER_DEFAULTS``."""

    lr: float = 2e-2          # Adam learning rate of the decoupled w (SepME, Eq. 10)
    gcirs_lr: float = 1e-4    # Adam learning rate of dW when G-CiRs edits weights directly (Alg. 1)
    beta: float = 5e-2        # dW = beta * w @ S^T (Eq. 10)
    lam: float = 0.0          # L1 weight (Eq. 11)
    alpha: float = 0.9        # momentum of the stop monitor (Eq. 4)
    tau: float = -5e-4        # stop threshold (Eq. 4) of decoupled increments (SepME); README: the tau sweep
    gcirs_tau: float = -8e-3  # stop threshold of increments G-CiRs trains on all attn2 weights (see README)
    cap: int = 300            # step cap
    warmup: int = 10          # minimum steps before the tau test
    batch: int = 4            # reference images per concept per step
    seed: int = 0
    min_null_dim: int = 16    # smaller null spaces are refused (CapacityError)

    def as_dict(self):
        return dict(self.__dict__)


class ErasureDiverged(FloatingPointError):
    """The loss became NaN/inf; ``.deltas`` holds the increments of the last good step."""

    def __init__(self, msg, deltas):
        super().__init__(msg)
        self.deltas = deltas


@dataclass
class Group:
    """Trainable tensors of one increment. ``basis`` is the null-space basis S (decoupled) or None."""

    name: str
    params: dict                      # trainable tensors: dW (G-CiRs) or w (decoupled), by UNet name
    basis: torch.Tensor | None = None
    beta: float = 1.0
    monitor: core.MomentumStop | None = None
    stopped_at: int | None = None
    info: dict = field(default_factory=dict)

    def dW(self) -> dict:
        """The increment: ``dW`` itself, or ``beta * w @ S^T`` (Eq. 10)."""
        if self.basis is None:
            return dict(self.params)
        return {k: self.beta * (w @ self.basis.T) for k, w in self.params.items()}

    def reg(self):
        return core.l1_regulariser(self.params.values())


def _gcirs_group(model, name, param_names) -> Group:
    params = {k: torch.zeros_like(p, requires_grad=True) for k, p in model.params(param_names).items()}
    return Group(name, params)


def _decoupled_group(model, name, protect_prompts, s: Settings) -> Group:
    """``dW = beta * w S^T`` on every attn2 to_k/to_v, with S spanning null(A) of the protected prompts."""
    A = core.stack_rows(model, protect_prompts)
    S, sv, rank = core.null_space(A)
    core.check_capacity(S.shape[1], A.shape[1], rank, len(protect_prompts), name, s.min_null_dim)
    S = S.to(model.device, torch.float32)
    params = {k: torch.zeros(p.shape[0], S.shape[1], device=model.device, requires_grad=True)
              for k, p in model.params(model.kv_weight_names()).items()}
    return Group(name, params, basis=S, beta=s.beta,
                 info=dict(null_dim=S.shape[1], rank=rank, d_in=A.shape[1], protected=list(protect_prompts)))


def _train(model, concepts, groups, owner, s: Settings, skip_empty: bool, progress=True, desc="erasing"):
    """The shared loop (see the module docstring). ``owner[i]`` is the group index of concept ``i``."""
    gen = torch.Generator().manual_seed(s.seed)
    base = model.params({k for g in groups for k in g.params})
    opts = [torch.optim.Adam(list(g.params.values()), lr=s.lr if g.basis is not None else s.gcirs_lr) for g in groups]
    for g in groups:
        g.monitor = core.MomentumStop(s.alpha, s.tau if g.basis is not None else s.gcirs_tau, s.warmup, s.cap)
    embs = [c.embedding(model) for c in concepts]
    c0 = model.empty()
    hist = dict(step=[], lcor=[[] for _ in concepts], eta=[[] for _ in concepts],
                lmom=[[] for _ in groups])
    t_start = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=s.cap, desc=desc, leave=False)
    step = 0
    while any(g.stopped_at is None for g in groups):
        active = [i for i, c in enumerate(concepts) if groups[owner[i]].stopped_at is None]
        # 1. x_t for each active concept
        xs, es, ts = [], [], []
        for i in active:
            z0 = concepts[i].latents[core.rng_choice(gen, len(concepts[i].latents), s.batch)]
            t = torch.randint(0, model.num_train_timesteps, (s.batch,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            xs.append(model.add_noise(z0, noise.to(model.device), t.to(model.device)))
            es.append(embs[i][core.rng_choice(gen, len(embs[i]), s.batch)])  # one of the concept's prompts each
            ts.append(t)
        X, E, T = torch.cat(xs), torch.cat(es), torch.cat(ts).to(model.device)
        E0 = c0.expand(len(X), -1, -1)
        # 2. frozen representations r_theta(c), no gradient
        with torch.no_grad():
            e_c, e_0 = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0])).chunk(2)
            r = core.concept_representation(e_c, e_0)
        # 3. the edited model, one pass; stopped groups contribute constants
        dws = [g.dW() if g.stopped_at is None else {k: v.detach() for k, v in g.dW().items()} for g in groups]
        weights = {}
        for k, w in base.items():  # theta + sum_g dTheta_g, in the base weights' dtype (fp16 on a GPU)
            weights[k] = (w.detach().float() + sum(d[k] for d in dws if k in d)).to(w.dtype)
        if skip_empty:
            e_c_new = model.eps(X, T, E, weights)
            r_new = core.concept_representation(e_c_new, e_0)
        else:
            e_c_new, e_0_new = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0]), weights).chunk(2)
            r_new = core.concept_representation(e_c_new, e_0_new)
        # 4. eta-balanced correlation losses + L1
        rs, rns = r.split(s.batch), r_new.split(s.batch)
        lcors = [core.correlation_loss(a, b) for a, b in zip(rs, rns)]
        etas = core.eta_weights(rs, rns)
        loss = sum(e * l for e, l in zip(etas, lcors))
        if s.lam:
            loss = loss + s.lam * sum(g.reg() for g in groups if g.stopped_at is None)
        if not torch.isfinite(loss):
            last = [Delta(c.name, "diverged", {k: v.detach().clone() for k, v in groups[owner[i]].dW().items()},
                          model.fingerprint(), s.as_dict(), dict(diverged_at=step)) for i, c in enumerate(concepts)]
            raise ErasureDiverged(f"the erasure loss became {float(loss.detach())} at step {step}; lower the learning "
                                  f"rate (now {s.lr:g}); the increments of the last good step are in .deltas", last)
        for o, g in zip(opts, groups):
            if g.stopped_at is None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        for o, g in zip(opts, groups):
            if g.stopped_at is None:
                o.step()
        # 5. monitors per group
        step += 1
        hist["step"].append(step)
        per_group = {}
        for j, i in enumerate(active):
            hist["lcor"][i].append(float(lcors[j].detach()))
            hist["eta"][i].append(etas[j])
            per_group[owner[i]] = per_group.get(owner[i], 0.0) + etas[j] * float(lcors[j].detach())
        for gi, val in per_group.items():
            g = groups[gi]
            stop = g.monitor.update(val)
            hist["lmom"][gi].append(g.monitor.value)
            if stop:
                g.stopped_at = step
                g.info["stop_reason"] = g.monitor.reason
        if bar is not None:
            bar.update(1)
            bar.set_postfix(L=f"{float(loss.detach()):.3g}")
    if bar is not None:
        bar.close()
    seconds = time.time() - t_start
    for g in groups:
        g.info.update(steps=g.stopped_at, seconds=round(seconds, 2))
    return hist


def _delta(model, group: Group, name, method, s: Settings, hist, extra=None) -> Delta:
    info = dict(group.info)
    info["history"] = hist
    info.update(extra or {})
    return Delta(name, method, {k: v.detach().clone() for k, v in group.dW().items()}, model.fingerprint(),
                 s.as_dict(), info)


def gcirs(model, concepts, settings: Settings | None = None, params: str = "cross_attention", progress=True):
    """G-CiRs (Alg. 1) on all cross-attention parameters (``params="cross_attention"``) or on to_k/to_v
    (``"kv"``), for one or several concepts at once (eta-balanced, one shared increment and monitor).
    Returns one :class:`Delta` named after the concepts joined by ``+``."""
    s = settings or Settings()
    names = model.cross_attention_param_names() if params == "cross_attention" else model.kv_weight_names()
    g = _gcirs_group(model, "+".join(c.name for c in concepts), names)
    hist = _train(model, concepts, [g], [0] * len(concepts), s, skip_empty=False, progress=progress,
                  desc=f"G-CiRs {g.name}")
    return _delta(model, g, g.name, "gcirs", s, hist, dict(concepts=[c.name for c in concepts], params=params))


def sepme(model, concepts, mode: str = "separate", settings: Settings | None = None, protect=(),
          progress=True) -> list[Delta]:
    """SepME: one increment ``dTheta_i`` per concept on every attn2 to_k/to_v.

    ``mode``:
      * ``"separate"`` (SepME_1): each ``dTheta_i`` trained alone; ``A_i`` = ``c_0`` + every other concept
        + ``protect``.
      * ``"joint"`` (SepME_1, one loop): the same null spaces, all increments trained together with eta
        balancing and a per-concept stop that freezes that increment.
      * ``"iterative"`` (SepME_2): ``dTheta_1`` by G-CiRs on all cross-attention parameters, then
        ``dTheta_t`` on the base weights with ``A_t`` = ``c_0`` + concepts ``1..t-1`` + ``protect``.

    Capacity is checked for every concept before any training starts (:class:`core.CapacityError`).
    """
    s = settings or Settings()
    if mode not in ("separate", "joint", "iterative"):
        raise ValueError(f"unknown mode {mode!r}; use 'separate', 'joint' or 'iterative'")
    concepts = list(concepts)
    protect = list(protect)
    prompts = [c.prompts for c in concepts]  # every prompt of every concept is protected from the others

    def flat(lists):
        return [p for ps in lists for p in ps]

    if mode == "iterative":
        sets = [None] + [[""] + flat(prompts[:t]) + protect for t in range(1, len(concepts))]
    else:
        sets = [[""] + flat(prompts[:i] + prompts[i + 1:]) + protect for i in range(len(concepts))]
    # build (and capacity-check) every group before training anything
    groups = [None if p is None else _decoupled_group(model, c.name, p, s) for c, p in zip(concepts, sets)]
    method = {"separate": "sepme1", "joint": "sepme1_joint", "iterative": "sepme2"}[mode]
    deltas = []
    if mode == "joint":
        hist = _train(model, concepts, groups, list(range(len(concepts))), s, skip_empty=True, progress=progress,
                      desc="SepME joint")
        return [_delta(model, g, c.name, method, s, hist, dict(mode=mode)) for g, c in zip(groups, concepts)]
    for t, (c, g) in enumerate(zip(concepts, groups)):
        if g is None:  # SepME_2 step 1: G-CiRs on all cross-attention parameters
            d = gcirs(model, [c], s, progress=progress)
            d.method, d.info["mode"] = method, mode
            deltas.append(d)
            continue
        hist = _train(model, [c], [g], [0], s, skip_empty=True, progress=progress, desc=f"SepME {c.name}")
        deltas.append(_delta(model, g, c.name, method, s, hist, dict(mode=mode, stage=t + 1)))
    return deltas


# ------------------------------------------------------------------------------------ bundled increments
BUNDLED_DIR = config.DATA / "deltas"  # written by `python -m sepme_lib.bench deltas`


def bundled_deltas(model, names=("striped", "checkered", "dotted")) -> list[Delta]:
    """The bundled model's SepME_1 increments of ``names``, trained with the default :class:`Settings` (up to 300
    steps, stopped by Eq. 4) by ``python -m sepme_lib.bench deltas`` and shipped in ``data/deltas/``.

    Notebook 05 uses them in the ``ci`` profile so that its widgets show a real erasure without minutes of training;
    notebook 03 trains the same increments live. Refuses another base model (:class:`deltas.BaseModelMismatch`).
    """
    out = []
    for name in names:
        path = BUNDLED_DIR / f"sepme1_{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no bundled increment for {name!r} at {path}; bundled: "
                                    f"{sorted(p.stem for p in BUNDLED_DIR.glob('*.safetensors'))}. "
                                    "Create them with `python -m sepme_lib.bench deltas`")
        d = Delta.load(path, device=model.device)
        d.check_base(model)
        out.append(d)
    return out
